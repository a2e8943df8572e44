//! Consumer-group leases: which consumer holds which message until when.
//!
//! Leader-local soft state, sans-IO (time comes in as `now_ms`). Acknowledged
//! progress is replicated ([`QueueProgress`]); leases are not: after a restart or
//! failover every unacked message becomes deliverable again (at-least-once).

use crate::state::progress::QueueProgress;
use escrow_proto::{ErrorCode, QueueInfo, ReceiptHandle};
use std::collections::BTreeMap;

/// One message leased to one consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    id: u64,
    visible_at_ms: u64,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct QueueLeases {
    /// Next offset never leased since this state was created.
    cursor: u64,
    leases: BTreeMap<u64, Lease>,
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

    /// Leases up to `max` deliverable messages: expired leases first, then never-leased
    /// offsets, each queue in offset order, starting queue rotating between calls.
    pub fn select(
        &mut self,
        now_ms: u64,
        max: usize,
        invisible_for_ms: u64,
        ends: &[QueueInfo],
        progress: Option<&[QueueProgress]>,
    ) -> Vec<Leased> {
        let mut out = Vec::new();
        let n = self.queues.len().min(ends.len());
        if n == 0 {
            return out;
        }
        let start = self.next_start % n;
        self.next_start = self.next_start.wrapping_add(1);
        let visible_at_ms = now_ms.saturating_add(invisible_for_ms);
        for step in 0..n {
            if out.len() >= max {
                break;
            }
            let queue = (start + step) % n;
            let done = progress.and_then(|p| p.get(queue));
            let acked = |offset: u64| done.is_some_and(|p| p.is_acked(offset));
            let q = &mut self.queues[queue];
            q.leases.retain(|offset, _| !acked(*offset));
            for (&offset, lease) in q.leases.iter_mut() {
                if out.len() >= max {
                    break;
                }
                if lease.visible_at_ms <= now_ms {
                    lease.id = self.next_lease;
                    self.next_lease += 1;
                    lease.visible_at_ms = visible_at_ms;
                    lease.deliveries += 1;
                    out.push(Leased {
                        queue: queue as u32,
                        offset,
                        lease: lease.id,
                        deliveries: lease.deliveries,
                    });
                }
            }
            let end = ends[queue];
            q.cursor = q
                .cursor
                .max(end.low_offset)
                .max(done.map_or(0, |p| p.floor));
            while q.cursor < end.next_offset && out.len() < max {
                let offset = q.cursor;
                q.cursor += 1;
                if acked(offset) || q.leases.contains_key(&offset) {
                    continue;
                }
                let lease = Lease {
                    id: self.next_lease,
                    visible_at_ms,
                    deliveries: 1,
                };
                self.next_lease += 1;
                q.leases.insert(offset, lease);
                out.push(Leased {
                    queue: queue as u32,
                    offset,
                    lease: lease.id,
                    deliveries: 1,
                });
            }
        }
        out
    }

    /// When the earliest lease expires, if any.
    pub fn next_expiry(&self) -> Option<u64> {
        self.queues
            .iter()
            .flat_map(|q| q.leases.values().map(|l| l.visible_at_ms))
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
            q.leases.remove(&offset);
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

    /// Messages leased and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.leases.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let first = g.select(0, 10, 1000, &e, None);
        assert_eq!(
            first.iter().map(|l| l.offset).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(g.select(500, 10, 1000, &e, None).is_empty());
        assert_eq!(g.next_expiry(), Some(1000));
        let again = g.select(1000, 10, 1000, &e, None);
        assert_eq!(again.len(), 3);
        assert!(again.iter().all(|l| l.deliveries == 2));
        assert!(again.iter().all(|l| l.lease >= 103), "new lease ids");
    }

    #[test]
    fn acked_offsets_are_never_redelivered() {
        let mut g = GroupLeases::new(1, 1);
        let e = ends(&[4]);
        g.select(0, 10, 100, &e, None);
        let mut p = QueueProgress::default();
        p.ack(0);
        p.ack(2);
        let again = g.select(100, 10, 100, &e, Some(std::slice::from_ref(&p)));
        assert_eq!(again.iter().map(|l| l.offset).collect::<Vec<_>>(), [1, 3]);
        // A fresh lease table (after a restart) skips acked offsets too.
        let mut fresh = GroupLeases::new(1, 1000);
        let got = fresh.select(0, 10, 100, &e, Some(std::slice::from_ref(&p)));
        assert_eq!(got.iter().map(|l| l.offset).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn stale_receipts() {
        let mut g = GroupLeases::new(1, 1);
        let e = ends(&[1]);
        let first = g.select(0, 1, 100, &e, None)[0].receipt();
        assert_eq!(g.check_ack(50, &first), Ok(()));
        let second = g.select(100, 1, 100, &e, None)[0].receipt();
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
        let a = g.select(0, 4, 100, &e, None);
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|l| l.queue == 0));
        let b = g.select(0, 4, 100, &e, None);
        assert!(b.iter().all(|l| l.queue == 1));
        assert_eq!(g.in_flight(), 8);
    }
}
