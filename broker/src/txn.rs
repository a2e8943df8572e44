//! Check-back of pending transactions, run by the leader from replicated state.
//!
//! The schedule (checks made, next check time) is replicated, so a new leader resumes
//! where the old one stopped. Which producer instances are connected is leader-local:
//! transactional producers long-poll (`PollChecks`) with their group and instance, and a
//! due check goes to the instance that sent the half message if it is polling, else round
//! robin over the group's polling instances. A check is counted (replicated
//! `TxnChecked`) only after the producer's QUIC stack acknowledged the response carrying
//! it; a check that was not delivered is not counted and goes to another instance.

use crate::broker::Shared;
use crate::state::command::Command;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// An instance that polled this recently still counts as connected between two polls.
const LIVE_GRACE: Duration = Duration::from_millis(300);
/// A check handed to an instance's mailbox and not taken by then goes elsewhere.
const REASSIGN_AFTER: Duration = Duration::from_secs(1);
/// How often the leader looks for due checks.
const SCAN_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Instance {
    polls: usize,
    last_seen: Instant,
    mailbox: Vec<u64>,
    wake: Arc<Notify>,
}

impl Instance {
    fn live(&self, now: Instant) -> bool {
        self.polls > 0 || now.duration_since(self.last_seen) < LIVE_GRACE
    }
}

#[derive(Debug, Default)]
struct Group {
    instances: BTreeMap<String, Instance>,
    next: usize,
}

#[derive(Debug, Default)]
struct Registry {
    groups: HashMap<String, Group>,
    /// Transaction -> when it was put in a mailbox.
    assigned: HashMap<u64, Instant>,
}

/// Leader-local: which producer instances poll, and the checks waiting for them.
#[derive(Debug, Default)]
pub(crate) struct CheckRegistry {
    inner: Mutex<Registry>,
}

impl CheckRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A poll starts: returns what wakes it when a check arrives.
    pub(crate) fn poll_begin(&self, group: &str, instance: &str) -> Arc<Notify> {
        let mut r = self.lock();
        let entry = r
            .groups
            .entry(group.to_string())
            .or_default()
            .instances
            .entry(instance.to_string())
            .or_insert_with(|| Instance {
                polls: 0,
                last_seen: Instant::now(),
                mailbox: Vec::new(),
                wake: Arc::new(Notify::new()),
            });
        entry.polls += 1;
        entry.last_seen = Instant::now();
        entry.wake.clone()
    }

    /// Takes the checks waiting for an instance.
    pub(crate) fn take(&self, group: &str, instance: &str) -> Vec<u64> {
        let mut r = self.lock();
        r.groups
            .get_mut(group)
            .and_then(|g| g.instances.get_mut(instance))
            .map(|i| std::mem::take(&mut i.mailbox))
            .unwrap_or_default()
    }

    /// A poll ends.
    pub(crate) fn poll_end(&self, group: &str, instance: &str) {
        let mut r = self.lock();
        if let Some(i) = r
            .groups
            .get_mut(group)
            .and_then(|g| g.instances.get_mut(instance))
        {
            i.polls = i.polls.saturating_sub(1);
            i.last_seen = Instant::now();
        }
    }

    /// Frees checks for dispatch again; `unreachable` names an instance that failed to
    /// take delivery, which is forgotten until it polls again.
    pub(crate) fn release(&self, txn_ids: &[u64], unreachable: Option<(&str, &str)>) {
        let mut r = self.lock();
        for id in txn_ids {
            r.assigned.remove(id);
        }
        if let Some((group, instance)) = unreachable {
            if let Some(g) = r.groups.get_mut(group) {
                g.instances.remove(instance);
            }
        }
    }

    /// Puts a due check in a live instance's mailbox: the origin if live, else round robin.
    /// Returns false when no instance of the group is live (nothing is counted then).
    fn dispatch(&self, txn_id: u64, group: &str, origin: &str, now: Instant) -> bool {
        let mut r = self.lock();
        if r.assigned
            .get(&txn_id)
            .is_some_and(|at| now.duration_since(*at) < REASSIGN_AFTER)
        {
            return true;
        }
        let Some(g) = r.groups.get_mut(group) else {
            return false;
        };
        // Forget instances gone for long, so the registry does not grow without bound.
        g.instances
            .retain(|_, i| i.polls > 0 || now.duration_since(i.last_seen) < REASSIGN_AFTER * 10);
        let target = match g.instances.get(origin) {
            Some(i) if i.live(now) => Some(origin.to_string()),
            _ => {
                let live: Vec<&String> = g
                    .instances
                    .iter()
                    .filter(|(_, i)| i.live(now))
                    .map(|(name, _)| name)
                    .collect();
                if live.is_empty() {
                    None
                } else {
                    g.next = g.next.wrapping_add(1);
                    Some(live[g.next % live.len()].clone())
                }
            }
        };
        let Some(target) = target else {
            return false;
        };
        // A reassigned check may still sit in a dead instance's mailbox: move it.
        for other in g.instances.values_mut() {
            other.mailbox.retain(|id| *id != txn_id);
        }
        let Some(instance) = g.instances.get_mut(&target) else {
            return false;
        };
        instance.mailbox.push(txn_id);
        instance.wake.notify_one();
        r.assigned.insert(txn_id, now);
        true
    }

    /// Forgets assignments of transactions that are no longer due.
    fn retain_assigned(&self, due: impl Fn(u64) -> bool) {
        self.lock().assigned.retain(|id, _| due(*id));
    }

    /// Drops all leader-local state (leadership lost).
    fn clear(&self) {
        let mut r = self.lock();
        r.assigned.clear();
        for g in r.groups.values_mut() {
            for i in g.instances.values_mut() {
                i.mailbox.clear();
            }
        }
    }
}

/// On the leader: dispatches due checks and abandons transactions out of checks.
pub(crate) async fn check_back_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SCAN_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        let leader = shared.require_leader().is_ok();
        if !leader {
            if was_leader {
                shared.checks.clear();
            }
            was_leader = false;
            continue;
        }
        was_leader = true;
        let now_ms = escrow_client::now_ms();
        let now = Instant::now();
        let mut abandon = Vec::new();
        let mut due = Vec::new();
        {
            let view = shared.view();
            for (id, txn) in &view.txns {
                if txn.next_check_at_ms > now_ms {
                    continue;
                }
                if txn.checks >= shared.config.txn_settings(&txn.topic).max_checks {
                    abandon.push(*id);
                } else {
                    due.push((*id, txn.producer_group.clone(), txn.instance.clone()));
                }
            }
            shared.checks.retain_assigned(|id| {
                view.txns
                    .get(&id)
                    .is_some_and(|t| t.next_check_at_ms <= now_ms)
            });
        }
        for (id, group, origin) in due {
            shared.checks.dispatch(id, &group, &origin, now);
        }
        if !abandon.is_empty() {
            let count = abandon.len();
            match shared
                .proposer
                .propose(Command::AbandonTxns { txn_ids: abandon })
                .await
            {
                Ok(_) => tracing::warn!(
                    count,
                    topic = escrow_proto::txn::ABANDONED_TOPIC,
                    "transactions unresolved after their maximum checks were abandoned"
                ),
                Err(e) => tracing::debug!(error = ?e, "abandoning transactions failed; will retry"),
            }
        }
    }
}
