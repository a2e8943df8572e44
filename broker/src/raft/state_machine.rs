//! The openraft state machine over [`crate::state::StateMachine`], with snapshots.
//!
//! Applies run without an fsync of their own (the log is the durable record); the
//! state is made durable at least once a second, after every few MiB of messages, and
//! always before a snapshot is handed out, because openraft purges the log behind
//! snapshots.

use super::{io_error, Entry, LogId, StorageError, StoredMembership, TypeConfig};
use crate::state::command::Output;
use crate::state::StateMachine;
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LAST_APPLIED: &str = "last_applied";
const MEMBERSHIP: &str = "membership";
/// Longest time applied state may stay only in redb's memory before an fsync.
const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// Message bytes applied before the state is made durable anyway. A durable commit
/// writes out everything buffered since the last one and stalls applies meanwhile; with
/// bodies in the log that is their records' metadata only, and the bound mostly limits
/// a restart's replay.
const DURABLE_AFTER_BYTES: u64 = 2 * 1024 * 1024;
/// Largest apply (message bytes) run on the async worker instead of the blocking pool.
const INLINE_APPLY_BYTES: u64 = 256 * 1024;

/// Message bytes an entry carries.
fn body_bytes(entry: &Entry) -> u64 {
    match &entry.payload {
        EntryPayload::Normal(batch) => batch.commands.iter().map(|c| c.body_bytes() as u64).sum(),
        _ => 0,
    }
}

#[derive(Debug)]
struct Inner {
    machine: StateMachine,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<(SnapshotMeta<u64, super::NodeAddr>, Vec<u8>)>,
    last_durable: Instant,
    /// Message bytes applied since `last_durable`.
    bytes_since_durable: u64,
    /// Highest log index applied since `last_durable`: a durable commit may point into
    /// the log only once the log holds that entry durably too.
    applied_since_durable: Option<u64>,
    snapshots_built: u64,
}

/// The state machine store; clones share it.
#[derive(Clone, Debug)]
pub struct StateMachineStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::StateMachine, verb, &Failure(e.to_string()))
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::Snapshot(None), verb, &Failure(e.to_string()))
}

impl StateMachineStore {
    /// Wraps a state machine, reading the Raft metadata it stored.
    pub fn new(machine: StateMachine) -> Result<StateMachineStore, StorageError> {
        let read = |key: &str| {
            machine
                .store()
                .raft_meta(key)
                .map_err(|e| sm_err(ErrorVerb::Read, e))
        };
        let last_applied = match read(LAST_APPLIED)? {
            Some(bytes) => postcard::from_bytes(&bytes).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => None,
        };
        let membership = match read(MEMBERSHIP)? {
            Some(bytes) => postcard::from_bytes(&bytes).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => StoredMembership::default(),
        };
        Ok(StateMachineStore {
            inner: Arc::new(Mutex::new(Inner {
                machine,
                last_applied,
                membership,
                snapshot: None,
                last_durable: Instant::now(),
                bytes_since_durable: 0,
                applied_since_durable: None,
                snapshots_built: 0,
            })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state machine under its lock, off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Write, e))?
    }
}

impl Inner {
    /// Whether the apply bringing `incoming` message bytes must also make the state durable.
    fn durable_due(&self, incoming: u64) -> bool {
        self.last_durable.elapsed() >= DURABLE_EVERY
            || self.bytes_since_durable + incoming >= DURABLE_AFTER_BYTES
    }

    /// Applies `entries` (carrying `bytes` of messages) in one write transaction.
    fn apply(
        &mut self,
        entries: &[Entry],
        bytes: u64,
        durable: bool,
    ) -> Result<Vec<Vec<Output>>, StorageError> {
        let store = self.machine.store().clone();
        let mut tx = self
            .machine
            .begin()
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let mut replies = Vec::with_capacity(entries.len());
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            match &entry.payload {
                EntryPayload::Blank => replies.push(Vec::new()),
                EntryPayload::Normal(batch) => {
                    replies.push(tx.apply(entry.log_id.index, batch).map_err(|e| {
                        io_error(
                            ErrorSubject::Apply(entry.log_id),
                            ErrorVerb::Write,
                            &Failure(e.to_string()),
                        )
                    })?)
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    replies.push(Vec::new());
                }
            }
        }
        let applied_bytes =
            postcard::to_allocvec(&self.last_applied).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let membership_bytes =
            postcard::to_allocvec(&self.membership).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        tx.put_raft_meta(LAST_APPLIED, &applied_bytes)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        tx.put_raft_meta(MEMBERSHIP, &membership_bytes)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        // Only entries that brought published bodies are pointed into.
        if let Some(last) = entries.iter().rev().find(|e| match &e.payload {
            EntryPayload::Normal(batch) => batch.bodies().next().is_some(),
            _ => false,
        }) {
            self.applied_since_durable = Some(last.log_id.index);
        }
        if durable {
            wait_log_durable(self.applied_since_durable, &store)?;
        }
        tx.commit(self.last_applied.map_or(0, |l| l.index), durable)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        if durable {
            self.durable_done();
        } else {
            self.bytes_since_durable += bytes;
        }
        Ok(replies)
    }

    fn durable_done(&mut self) {
        self.last_durable = Instant::now();
        self.bytes_since_durable = 0;
        self.applied_since_durable = None;
    }

    /// Commits an empty transaction durably, persisting every earlier apply.
    fn make_durable(&mut self) -> Result<(), StorageError> {
        let index = self.last_applied.map_or(0, |l| l.index);
        wait_log_durable(self.applied_since_durable, self.machine.store())?;
        self.machine
            .begin()
            .and_then(|tx| tx.commit(index, true))
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        self.durable_done();
        Ok(())
    }

    /// Makes the state durable and freezes a view of it with its metadata (under the lock).
    fn freeze(&mut self) -> Result<FrozenSnapshot, StorageError> {
        self.make_durable()?;
        let view = self
            .machine
            .store()
            .freeze()
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        self.snapshots_built += 1;
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.snapshots_built),
            None => format!("empty-{}", self.snapshots_built),
        };
        Ok(FrozenSnapshot {
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
                snapshot_id,
            },
            view,
            store: self.machine.store().clone(),
        })
    }
}

/// Waits until the log holds every entry up to `applied_since_durable`: records of the
/// state point into those entries for their bodies.
fn wait_log_durable(
    applied_since_durable: Option<u64>,
    store: &crate::storage::Store,
) -> Result<(), StorageError> {
    match (applied_since_durable, store.log()) {
        (Some(index), Some(log)) => log
            .wait_durable(index)
            .map_err(|e| sm_err(ErrorVerb::Write, e)),
        _ => Ok(()),
    }
}

/// A frozen state-machine view and the snapshot metadata that describes it.
struct FrozenSnapshot {
    meta: SnapshotMeta<u64, super::NodeAddr>,
    view: crate::storage::Frozen,
    store: Arc<crate::storage::Store>,
}

impl StateMachineStore {
    /// Builds a snapshot: freezes under the lock, serializes without holding it, so
    /// applies continue while a large state is exported.
    async fn snapshot(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let frozen = self.blocking(|inner| inner.freeze()).await?;
        let FrozenSnapshot { meta, view, store } = frozen;
        let data = tokio::task::spawn_blocking(move || store.export(view))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let mut inner = self.lock();
        let newer = inner
            .snapshot
            .as_ref()
            .is_some_and(|(m, _)| m.last_log_id > meta.last_log_id);
        if !newer {
            inner.snapshot = Some((meta.clone(), data.clone()));
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.snapshot().await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Output>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let bytes: u64 = entries.iter().map(body_bytes).sum();
        // A small apply that needs no fsync runs in place: the hop to the blocking pool
        // and back cost two thread wake-ups per node per Raft round, more than the apply.
        if let Ok(mut inner) = self.inner.try_lock() {
            if bytes <= INLINE_APPLY_BYTES && !inner.durable_due(bytes) {
                return inner.apply(&entries, bytes, false);
            }
        }
        self.blocking(move |inner| {
            let durable = inner.durable_due(bytes);
            inner.apply(&entries, bytes, durable)
        })
        .await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, super::NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let meta = meta.clone();
        let data = snapshot.into_inner();
        self.blocking(move |inner| {
            inner
                .machine
                .install(&data)
                .map_err(|e| snap_err(ErrorVerb::Write, e))?;
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership.clone();
            // The image holds its bodies: nothing points into this node's log any more.
            inner.durable_done();
            inner.snapshot = Some((meta, data));
            Ok(())
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // The state machine is itself persistent: its current state is always a valid snapshot.
        {
            let inner = self.lock();
            if let Some((meta, data)) = &inner.snapshot {
                return Ok(Some(Snapshot {
                    meta: meta.clone(),
                    snapshot: Box::new(Cursor::new(data.clone())),
                }));
            }
            if inner.last_applied.is_none() {
                return Ok(None);
            }
        }
        self.snapshot().await.map(Some)
    }
}
