//! Consumer-group leases: which consumer holds which message until when.
//!
//! Leader-local soft state, sans-IO (time comes in as `now_ms`, message metadata
//! through a callback). Acknowledged progress is replicated ([`QueueProgress`]);
//! leases are not: after a restart or failover every unacked message becomes
//! deliverable again (at-least-once) and delivery counts start over.
//!
//! Besides plain leases the table keeps, per queue, messages it has looked at but
//! could not lease yet ("held"): delayed messages before their time, and messages of
//! a FIFO message group while an earlier one of that group is leased. Message groups
//! route to one queue, so a queue's held set in offset order is publish order.

use crate::state::progress::QueueProgress;
use escrow_proto::{ErrorCode, QueueInfo, ReceiptHandle};
use std::collections::{BTreeMap, HashSet};

/// Most held messages per queue; scanning pauses while a queue is at the limit.
const MAX_HELD_PER_QUEUE: usize = 100_000;
/// Most new offsets examined per queue in one call, bounding one receive's work.
const MAX_SCAN_PER_CALL: u64 = 4096;
/// How long a message handed to the dead-letter path stays hidden before it is retried.
const DEAD_LETTER_RETRY_MS: u64 = 30_000;

/// What the lease table needs to know of a message before leasing it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageMeta {
    /// Hash of its FIFO message group, if it has one.
    pub fifo: Option<u64>,
    /// Not deliverable before this time (0: at once).
    pub deliver_at_ms: u64,
}

/// One message leased to one consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    id: u64,
    visible_at_ms: u64,
    deliveries: u32,
    fifo: Option<u64>,
}

#[derive(Debug, Default)]
struct QueueLeases {
    /// Next offset never examined since this state was created.
    cursor: u64,
    leases: BTreeMap<u64, Lease>,
    held: BTreeMap<u64, MessageMeta>,
    /// FIFO message groups with a message leased (or on its way to the dead-letter topic).
    busy: HashSet<u64>,
}

impl QueueLeases {
    fn drop_lease(&mut self, offset: u64) {
        if let Some(lease) = self.leases.remove(&offset) {
            if let Some(fifo) = lease.fifo {
                self.busy.remove(&fifo);
            }
        }
    }
}

/// A lease just granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leased {
    /// Queue of the message.
    pub queue: u32,
    /// Offset of the message.
    pub offset: u64,
    /// Lease id for the receipt.
    pub lease: u64,
    /// Deliveries to this group so far, this one included.
    pub deliveries: u32,
}

impl Leased {
    /// The receipt handle for this lease.
    pub fn receipt(&self) -> ReceiptHandle {
        ReceiptHandle {
            queue: self.queue,
            offset: self.offset,
            lease: self.lease,
        }
    }
}

/// A message that used up its deliveries: it belongs in the group's dead-letter topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// Queue of the message.
    pub queue: u32,
    /// Offset of the message.
    pub offset: u64,
    /// Deliveries made.
    pub deliveries: u32,
}

/// What one [`GroupLeases::select`] call decided.
#[derive(Debug, Default)]
pub struct Selection {
    /// Leases granted, to deliver now.
    pub leased: Vec<Leased>,
    /// Messages to move to the dead-letter topic.
    pub exhausted: Vec<Exhausted>,
}

/// How a group's messages are leased.
#[derive(Clone, Copy, Debug)]
pub struct LeasePolicy {
    /// How long a granted lease hides the message.
    pub invisible_for_ms: u64,
    /// Deliveries after which an unacked message is dead-lettered instead of redelivered.
    pub max_deliveries: u32,
}

fn grant(
    next_lease: &mut u64,
    q: &mut QueueLeases,
    queue: usize,
    offset: u64,
    fifo: Option<u64>,
    visible_at_ms: u64,
) -> Leased {
    let lease = Lease {
        id: *next_lease,
        visible_at_ms,
        deliveries: 1,
        fifo,
    };
    *next_lease += 1;
    if let Some(f) = fifo {
        q.busy.insert(f);
    }
    q.leases.insert(offset, lease);
    Leased {
        queue: queue as u32,
        offset,
        lease: lease.id,
        deliveries: 1,
    }
}

/// Leases of one consumer group on one topic.
#[derive(Debug)]
pub struct GroupLeases {
    queues: Vec<QueueLeases>,
    next_start: usize,
    next_lease: u64,
}

impl GroupLeases {
    /// Empty leases for a topic with `queues` queues. Lease ids start at `first_lease`
    /// (seed it from the clock so receipts from before a restart do not collide).
    pub fn new(queues: usize, first_lease: u64) -> GroupLeases {
        GroupLeases {
            queues: (0..queues).map(|_| QueueLeases::default()).collect(),
            next_start: 0,
            next_lease: first_lease,
        }
    }

    /// Leases up to `max` deliverable messages, starting queue rotating between calls.
    /// In each queue: expired leases first (or, out of deliveries, dead-lettered), then
    /// redriven and held messages that became leasable, then never-examined offsets.
    ///
    /// `meta(queue, from, to)` returns the metadata of offsets `from..to` of a queue.
    pub fn select<E>(
        &mut self,
        now_ms: u64,
        max: usize,
        policy: LeasePolicy,
        ends: &[QueueInfo],
        progress: Option<&[QueueProgress]>,
        meta: &mut dyn FnMut(u32, u64, u64) -> Result<Vec<MessageMeta>, E>,
    ) -> Result<Selection, E> {
        let mut out = Selection::default();
        let n = self.queues.len().min(ends.len());
        if n == 0 {
            return Ok(out);
        }
        let start = self.next_start % n;
        self.next_start = self.next_start.wrapping_add(1);
        let visible_at_ms = now_ms.saturating_add(policy.invisible_for_ms);
        let next_lease = &mut self.next_lease;
        for step in 0..n {
            if out.leased.len() >= max {
                break;
            }
            let queue = (start + step) % n;
            let done = progress.and_then(|p| p.get(queue));
            let acked = |offset: u64| done.is_some_and(|p| p.is_acked(offset));
            let q = &mut self.queues[queue];
            let gone: Vec<u64> = q.leases.keys().copied().filter(|o| acked(*o)).collect();
            for offset in gone {
                q.drop_lease(offset);
            }
            q.held.retain(|offset, _| !acked(*offset));

            // Expired leases: redeliver, or hand to the dead-letter path.
            for (&offset, lease) in q.leases.iter_mut() {
                if out.leased.len() >= max {
                    break;
                }
                if lease.visible_at_ms > now_ms {
                    continue;
                }
                if lease.deliveries >= policy.max_deliveries {
                    lease.visible_at_ms = now_ms.saturating_add(DEAD_LETTER_RETRY_MS);
                    out.exhausted.push(Exhausted {
                        queue: queue as u32,
                        offset,
                        deliveries: lease.deliveries,
                    });
                    continue;
                }
                lease.id = *next_lease;
                *next_lease += 1;
                lease.visible_at_ms = visible_at_ms;
                lease.deliveries += 1;
                out.leased.push(Leased {
                    queue: queue as u32,
                    offset,
                    lease: lease.id,
                    deliveries: lease.deliveries,
                });
            }

            // Redriven messages come back as new.
            if let Some(p) = done {
                for &offset in &p.reopened {
                    if !q.leases.contains_key(&offset) && !q.held.contains_key(&offset) {
                        if let Some(m) = meta(queue as u32, offset, offset + 1)?.first() {
                            q.held.insert(offset, *m);
                        }
                    }
                }
            }

            // Held messages whose time came or whose message group is free, in offset order.
            let ready: Vec<(u64, Option<u64>)> = {
                let mut claimed = HashSet::new();
                q.held
                    .iter()
                    .filter(|(_, m)| m.deliver_at_ms <= now_ms)
                    .filter(|(_, m)| {
                        m.fifo
                            .is_none_or(|f| !q.busy.contains(&f) && claimed.insert(f))
                    })
                    .map(|(o, m)| (*o, m.fifo))
                    .take(max - out.leased.len())
                    .collect()
            };
            for (offset, fifo) in ready {
                q.held.remove(&offset);
                out.leased
                    .push(grant(next_lease, q, queue, offset, fifo, visible_at_ms));
            }

            // Never-examined offsets.
            let end = ends[queue];
            q.cursor = q
                .cursor
                .max(end.low_offset)
                .max(done.map_or(0, |p| p.floor));
            let scan_end = end
                .next_offset
                .min(q.cursor.saturating_add(MAX_SCAN_PER_CALL));
            while q.cursor < scan_end && out.leased.len() < max && q.held.len() < MAX_HELD_PER_QUEUE
            {
                let want = (max - out.leased.len()) as u64;
                let to = scan_end.min(q.cursor + want.max(64));
                let metas = meta(queue as u32, q.cursor, to)?;
                for (i, m) in metas.into_iter().enumerate() {
                    let offset = q.cursor + i as u64;
                    if acked(offset) || q.leases.contains_key(&offset) {
                        continue;
                    }
                    let blocked = m.fifo.is_some_and(|f| q.busy.contains(&f));
                    if blocked || m.deliver_at_ms > now_ms || out.leased.len() >= max {
                        q.held.insert(offset, m);
                    } else {
                        out.leased
                            .push(grant(next_lease, q, queue, offset, m.fifo, visible_at_ms));
                    }
                }
                q.cursor = to;
            }
        }
        Ok(out)
    }

    /// When the next lease expires or held message becomes due, if any.
    pub fn next_expiry(&self) -> Option<u64> {
        self.queues
            .iter()
            .flat_map(|q| {
                q.leases
                    .values()
                    .map(|l| l.visible_at_ms)
                    .chain(q.held.values().map(|m| m.deliver_at_ms))
            })
            .min()
    }

    /// Whether an ack with `receipt` may be applied: refused only when another
    /// consumer holds a live lease on the message.
    pub fn check_ack(&self, now_ms: u64, receipt: &ReceiptHandle) -> Result<(), ErrorCode> {
        let q = self
            .queues
            .get(receipt.queue as usize)
            .ok_or(ErrorCode::INVALID_ARGUMENT)?;
        match q.leases.get(&receipt.offset) {
            Some(l) if l.id != receipt.lease && l.visible_at_ms > now_ms => {
                Err(ErrorCode::RECEIPT_STALE)
            }
            _ => Ok(()),
        }
    }

    /// Forgets the lease of an acked message.
    pub fn remove(&mut self, queue: u32, offset: u64) {
        if let Some(q) = self.queues.get_mut(queue as usize) {
            q.drop_lease(offset);
        }
    }

    /// Makes a leased message visible again `invisible_for_ms` from now (nack, extend).
    /// The receipt must name the current lease.
    pub fn change_visibility(
        &mut self,
        now_ms: u64,
        receipt: &ReceiptHandle,
        invisible_for_ms: u64,
    ) -> Result<(), ErrorCode> {
        let lease = self
            .queues
            .get_mut(receipt.queue as usize)
            .ok_or(ErrorCode::INVALID_ARGUMENT)?
            .leases
            .get_mut(&receipt.offset)
            .filter(|l| l.id == receipt.lease)
            .ok_or(ErrorCode::RECEIPT_STALE)?;
        lease.visible_at_ms = now_ms.saturating_add(invisible_for_ms);
        Ok(())
    }

    /// Undoes a lease that was granted but never delivered (the response had no room for it).
    pub fn give_back(&mut self, leased: &Leased) {
        if let Some(lease) = self
            .queues
            .get_mut(leased.queue as usize)
            .and_then(|q| q.leases.get_mut(&leased.offset))
            .filter(|l| l.id == leased.lease)
        {
            lease.visible_at_ms = 0;
            lease.deliveries = lease.deliveries.saturating_sub(1);
        }
    }

    /// Deliveries so far of the message a receipt names, if it is the current lease.
    pub fn deliveries(&self, receipt: &ReceiptHandle) -> Option<u32> {
        self.queues
            .get(receipt.queue as usize)?
            .leases
            .get(&receipt.offset)
            .filter(|l| l.id == receipt.lease)
            .map(|l| l.deliveries)
    }

    /// Messages leased and not yet acked, per queue.
    pub fn in_flight(&self) -> Vec<u64> {
        self.queues.iter().map(|q| q.leases.len() as u64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Selects with plain messages (no FIFO group, no delay) and 16 deliveries.
    fn pick(
        g: &mut GroupLeases,
        now: u64,
        max: usize,
        invisible_for_ms: u64,
        ends: &[QueueInfo],
        progress: Option<&[QueueProgress]>,
    ) -> Vec<Leased> {
        with_meta(g, now, max, invisible_for_ms, ends, progress, &|_, _| {
            MessageMeta::default()
        })
        .leased
    }

    fn with_meta(
        g: &mut GroupLeases,
        now: u64,
        max: usize,
        invisible_for_ms: u64,
        ends: &[QueueInfo],
        progress: Option<&[QueueProgress]>,
        meta: &dyn Fn(u32, u64) -> MessageMeta,
    ) -> Selection {
        let policy = LeasePolicy {
            invisible_for_ms,
            max_deliveries: 3,
        };
        let mut read = |queue: u32, from: u64, to: u64| {
            Ok::<_, ()>((from..to).map(|o| meta(queue, o)).collect())
        };
        g.select(now, max, policy, ends, progress, &mut read)
            .unwrap()
    }

    fn ends(next: &[u64]) -> Vec<QueueInfo> {
        next.iter()
            .map(|&n| QueueInfo {
                low_offset: 0,
                next_offset: n,
            })
            .collect()
    }

    #[test]
    fn leases_hide_messages_until_they_expire() {
        let mut g = GroupLeases::new(1, 100);
        let e = ends(&[3]);
        let first = pick(&mut g, 0, 10, 1000, &e, None);
        assert_eq!(
            first.iter().map(|l| l.offset).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(pick(&mut g, 500, 10, 1000, &e, None).is_empty());
        assert_eq!(g.next_expiry(), Some(1000));
        let again = pick(&mut g, 1000, 10, 1000, &e, None);
        assert_eq!(again.len(), 3);
        assert!(again.iter().all(|l| l.deliveries == 2));
        assert!(again.iter().all(|l| l.lease >= 103), "new lease ids");
    }

    #[test]
    fn acked_offsets_are_never_redelivered() {
        let mut g = GroupLeases::new(1, 1);
        let e = ends(&[4]);
        pick(&mut g, 0, 10, 100, &e, None);
        let mut p = QueueProgress::default();
        p.ack(0);
        p.ack(2);
        let again = pick(&mut g, 100, 10, 100, &e, Some(std::slice::from_ref(&p)));
        assert_eq!(again.iter().map(|l| l.offset).collect::<Vec<_>>(), [1, 3]);
        // A fresh lease table (after a restart) skips acked offsets too.
        let mut fresh = GroupLeases::new(1, 1000);
        let got = pick(&mut fresh, 0, 10, 100, &e, Some(std::slice::from_ref(&p)));
        assert_eq!(got.iter().map(|l| l.offset).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn stale_receipts() {
        let mut g = GroupLeases::new(1, 1);
        let e = ends(&[1]);
        let first = pick(&mut g, 0, 1, 100, &e, None)[0].receipt();
        assert_eq!(g.check_ack(50, &first), Ok(()));
        let second = pick(&mut g, 100, 1, 100, &e, None)[0].receipt();
        assert_ne!(first, second);
        assert_eq!(g.check_ack(150, &first), Err(ErrorCode::RECEIPT_STALE));
        assert_eq!(
            g.change_visibility(150, &first, 10),
            Err(ErrorCode::RECEIPT_STALE)
        );
        assert_eq!(g.change_visibility(150, &second, 0), Ok(()));
        // The second lease was given back: the first holder's ack now applies.
        assert_eq!(g.check_ack(150, &first), Ok(()));
    }

    #[test]
    fn queues_rotate_and_max_is_respected() {
        let mut g = GroupLeases::new(3, 1);
        let e = ends(&[5, 5, 5]);
        let a = pick(&mut g, 0, 4, 100, &e, None);
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|l| l.queue == 0));
        let b = pick(&mut g, 0, 4, 100, &e, None);
        assert!(b.iter().all(|l| l.queue == 1));
        assert_eq!(g.in_flight(), [4, 4, 0]);
    }

    #[test]
    fn fifo_groups_lease_one_message_at_a_time_in_order() {
        let mut g = GroupLeases::new(1, 1);
        let e = ends(&[6]);
        // Offsets 0, 2, 4 in group A; 1, 3, 5 in group B.
        let meta = |_, o: u64| MessageMeta {
            fifo: Some(o % 2),
            deliver_at_ms: 0,
        };
        let first = with_meta(&mut g, 0, 10, 100, &e, None, &meta).leased;
        assert_eq!(first.iter().map(|l| l.offset).collect::<Vec<_>>(), [0, 1]);
        assert!(with_meta(&mut g, 10, 10, 100, &e, None, &meta)
            .leased
            .is_empty());
        let mut p = QueueProgress::default();
        p.ack(1);
        g.remove(0, 1);
        let next = with_meta(
            &mut g,
            20,
            10,
            100,
            &e,
            Some(std::slice::from_ref(&p)),
            &meta,
        );
        assert_eq!(
            next.leased.iter().map(|l| l.offset).collect::<Vec<_>>(),
            [3]
        );
        // Group A's head expires: it is redelivered before anything behind it.
        let again = with_meta(
            &mut g,
            120,
            10,
            100,
            &e,
            Some(std::slice::from_ref(&p)),
            &meta,
        );
        assert_eq!(
            again
                .leased
                .iter()
                .map(|l| (l.offset, l.deliveries))
                .collect::<Vec<_>>(),
            [(0, 2), (3, 2)]
        );
    }

    #[test]
    fn delayed_messages_wait_for_their_time() {
        let mut g = GroupLeases::new(1, 1);
        let e = ends(&[2]);
        let meta = |_, o: u64| MessageMeta {
            fifo: None,
            deliver_at_ms: if o == 0 { 500 } else { 0 },
        };
        let now = with_meta(&mut g, 0, 10, 100, &e, None, &meta).leased;
        assert_eq!(now.iter().map(|l| l.offset).collect::<Vec<_>>(), [1]);
        assert_eq!(g.next_expiry(), Some(100));
        assert!(with_meta(&mut g, 499, 1, 1000, &e, None, &meta)
            .leased
            .iter()
            .all(|l| l.offset != 0));
        let later = with_meta(&mut g, 500, 10, 1000, &e, None, &meta).leased;
        assert!(later.iter().any(|l| l.offset == 0 && l.deliveries == 1));
    }

    #[test]
    fn out_of_deliveries_goes_to_the_dead_letter_path_once() {
        let mut g = GroupLeases::new(1, 1);
        let e = ends(&[1]);
        for round in 0..3u64 {
            let got = pick(&mut g, round * 100, 1, 100, &e, None);
            assert_eq!(got[0].deliveries, round as u32 + 1);
        }
        let s = with_meta(&mut g, 300, 1, 100, &e, None, &|_, _| {
            MessageMeta::default()
        });
        assert!(s.leased.is_empty());
        assert_eq!(
            s.exhausted,
            [Exhausted {
                queue: 0,
                offset: 0,
                deliveries: 3
            }]
        );
        // While the move is in flight the message is neither redelivered nor handed out again.
        let s = with_meta(&mut g, 400, 1, 100, &e, None, &|_, _| {
            MessageMeta::default()
        });
        assert!(s.leased.is_empty() && s.exhausted.is_empty());
    }

    #[test]
    fn redriven_offsets_are_delivered_again_as_new() {
        let mut g = GroupLeases::new(1, 1);
        let e = ends(&[3]);
        let mut p = QueueProgress::default();
        for o in 0..3 {
            p.ack(o);
        }
        assert!(pick(&mut g, 0, 10, 100, &e, Some(std::slice::from_ref(&p))).is_empty());
        p.reopen(1);
        let got = pick(&mut g, 0, 10, 100, &e, Some(std::slice::from_ref(&p)));
        assert_eq!(
            got.iter()
                .map(|l| (l.offset, l.deliveries))
                .collect::<Vec<_>>(),
            [(1, 1)]
        );
    }
}
