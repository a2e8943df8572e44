//! The Raft log and vote on redb (`raft-log.redb`).
//!
//! Tables: `entries` ((log index, chunk) -> a piece of the postcard entry) and `meta`
//! (vote, committed, last purged). One writer thread owns every write: it takes all
//! operations queued since its last commit (appends, truncations, purges, votes) and
//! applies them in order in one write transaction with one fsync, then reports each
//! append as flushed. Appended entries are readable at once from an in-memory cache of
//! the newest entries, which also spares replication and apply a decode from disk.
//!
//! The log is also where published message bodies live ([`crate::storage::BodyAt`]): a
//! purge behind a snapshot only moves the purge mark and entries stay readable for the
//! state machine ([`LogBodies`]), which makes its state durable only once the entries
//! it points into are.

use super::{io_error, Entry, LogId, StorageError, TypeConfig};
use crate::metrics::Metrics;
use crate::state::command::Command;
use crate::storage::LogBodies;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::EntryPayload;
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Condvar, Mutex};

const ENTRIES: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Largest piece of an encoded entry stored as one value. redb gives a value larger than
/// a page a page of its own, rounded up to a power of two (a 70 KB entry would take
/// 128 KB of file and page cache); chunks just under 16 KiB fill theirs.
const CHUNK_BYTES: usize = 16 * 1024 - 256;
/// Entries read from disk for their bodies, kept decoded (a consumer reading one queue
/// reads ~one entry per hundred messages; several queues share each entry), up to a
/// count and a size.
const BODY_ENTRIES_KEPT: usize = 64;
const BODY_ENTRIES_KEPT_BYTES: usize = 16 * 1024 * 1024;
/// Longest wait for the log to make an applied entry durable before a state commit.
const DURABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Entries kept in memory beyond those still waiting for their fsync.
const CACHE_MAX_ENTRIES: usize = 4096;
/// redb page cache of the log file.
const LOG_DB_CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Message bytes the cache may hold (unflushed entries are always kept).
const CACHE_MAX_BYTES: usize = 32 * 1024 * 1024;
/// How often the committed-index hint rides along with a log write. It only shortens a
/// restart's replay, and leaving it out keeps the meta table's pages (a leaf and its
/// table-root update) out of most log commits.
const COMMITTED_HINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure(e.to_string())
}

fn logs_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::Logs, verb, &fail(e))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Failure> {
    escrow_proto::frame::encode_after(&[], value).map_err(fail)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    postcard::from_bytes(bytes).map_err(fail)
}

/// A contiguous run of the newest entries, shared (not copied) with readers.
#[derive(Debug, Default)]
struct EntryCache {
    /// Each entry with its size and the number of the append that brought it.
    entries: BTreeMap<u64, (Entry, usize, u64)>,
    bytes: usize,
    /// Appends handed to the writer so far; they are numbered in queue order.
    submitted: u64,
    /// Appends the writer has made durable (it completes them in queue order). Only
    /// their entries may be evicted: an index alone would not do, since a truncation
    /// can replace entries while the write of the old ones is still in flight.
    durable: u64,
}

fn entry_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        EntryPayload::Normal(batch) => batch
            .commands
            .iter()
            .map(|c| match c {
                Command::Append { records, .. } => records
                    .iter()
                    .map(|(_, m)| m.body.len() + 64)
                    .sum::<usize>(),
                // Half messages carry bodies too (counted as 64 bytes, a cache of
                // transactions grew to its 4,096-entry bound, ~200 MiB per node).
                other => other.body_bytes() + 64,
            })
            .sum(),
        _ => 64,
    }
}

impl EntryCache {
    fn insert(&mut self, entry: Entry, append: u64) {
        let size = entry_bytes(&entry);
        self.bytes += size;
        if let Some((_, old, _)) = self
            .entries
            .insert(entry.log_id.index, (entry, size, append))
        {
            self.bytes -= old;
        }
    }

    fn evict(&mut self) {
        while self.entries.len() > CACHE_MAX_ENTRIES || self.bytes > CACHE_MAX_BYTES {
            match self.entries.first_key_value() {
                Some((&index, (_, _, append))) if *append <= self.durable => {
                    if let Some((_, size, _)) = self.entries.remove(&index) {
                        self.bytes -= size;
                    }
                }
                _ => break,
            }
        }
    }

    fn remove(&mut self, range: impl RangeBounds<u64>) {
        let keys: Vec<u64> = self.entries.range(range).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some((_, size, _)) = self.entries.remove(&k) {
                self.bytes -= size;
            }
        }
    }

    /// The entries in `range` if the cache holds all of them.
    fn get(&self, range: &impl RangeBounds<u64>) -> Option<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let first = *self.entries.keys().next()?;
        if start < first {
            return None;
        }
        Some(
            self.entries
                .range((range.start_bound().cloned(), range.end_bound().cloned()))
                .map(|(_, (e, _, _))| e.clone())
                .collect(),
        )
    }

    fn last(&self) -> Option<LogId> {
        self.entries.last_key_value().map(|(_, (e, _, _))| e.log_id)
    }
}

/// The highest log index the writer has made durable (every entry up to it is on disk,
/// as far as a later truncation has not removed it), and whether the writer stopped.
#[derive(Debug, Default)]
struct DurableIndex {
    state: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl DurableIndex {
    fn update(&self, f: impl FnOnce(&mut (u64, bool))) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }

    /// Follows a batch the writer made durable, in order: appends raise the index, a
    /// truncation lowers it below the entries it removed.
    fn after_write(&self, batch: &[Op]) {
        self.update(|(index, _)| {
            for op in batch {
                match op {
                    Op::Append(entries, _, _) => {
                        if let Some(last) = entries.last() {
                            *index = (*index).max(last.log_id.index);
                        }
                    }
                    Op::Truncate(from, _) => *index = (*index).min(from.saturating_sub(1)),
                    _ => {}
                }
            }
        });
    }

    fn wait_for(&self, index: u64) -> Result<(), String> {
        let deadline = std::time::Instant::now() + DURABLE_WAIT;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.0 < index {
            if state.1 {
                return Err(format!(
                    "the log writer stopped before entry {index} was durable"
                ));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "log entry {index} not durable after {DURABLE_WAIT:?}"
                ));
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

/// A write for the writer thread, applied in submission order.
/// (`Meta` without a waiter is the committed-index hint, folded into a later write.)
enum Op {
    /// Entries, the append's number (see [`EntryCache::submitted`]) and its callback.
    Append(Vec<Entry>, u64, LogFlushed<TypeConfig>),
    Truncate(u64, mpsc::SyncSender<Result<(), Failure>>),
    Purge(LogId, mpsc::SyncSender<Result<(), Failure>>),
    Meta(
        &'static str,
        Vec<u8>,
        Option<mpsc::SyncSender<Result<(), Failure>>>,
    ),
}

/// Holds the writer thread before its next write while set (fault injection: a stalled disk).
#[derive(Debug, Default)]
struct StallGate {
    stalled: Mutex<bool>,
    changed: Condvar,
}

impl StallGate {
    fn set(&self, stalled: bool) {
        *self.stalled.lock().unwrap_or_else(|e| e.into_inner()) = stalled;
        self.changed.notify_all();
    }

    fn wait_open(&self) {
        let guard = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        drop(
            self.changed
                .wait_while(guard, |stalled| *stalled)
                .unwrap_or_else(|e| e.into_inner()),
        );
    }
}

/// The writer thread's queue; dropping the last handle stops the thread and waits for it,
/// so the database file is closed when the last `LogStore` clone is gone.
#[derive(Debug)]
struct Writer {
    ops: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
    gate: Arc<StallGate>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.gate.set(false);
        self.ops.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Log storage; clones share the database, the cache and the writer.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Database>,
    cache: Arc<Mutex<EntryCache>>,
    writer: Arc<Writer>,
    /// The latest committed log id, written with a later durable batch (at most every
    /// [`COMMITTED_HINT_EVERY`], or with any meta write) and when the store closes.
    committed: Arc<Mutex<Option<Vec<u8>>>>,
    /// First index after the purged ones: entries before it stay stored, but Raft no
    /// longer sees them.
    unpurged_from: Arc<std::sync::atomic::AtomicU64>,
    durable: Arc<DurableIndex>,
    /// Entries recently read from disk for their bodies, newest last.
    read_for_bodies: Arc<Mutex<std::collections::VecDeque<Entry>>>,
}

impl LogStore {
    /// Opens or creates the log at `path` and starts its writer thread.
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<LogStore, redb::Error> {
        // Recent entries are served from the entry cache; redb's own cache stays small.
        let db = Database::builder()
            .set_cache_size(LOG_DB_CACHE_BYTES)
            .create_with_backend(crate::redb_file::CoalescingFile::open(path)?)?;
        let txn = db.begin_write()?;
        txn.open_table(ENTRIES)?;
        txn.open_table(META)?;
        txn.commit()?;
        let (on_disk, purged) = {
            let txn = db.begin_read()?;
            let last = txn.open_table(ENTRIES)?.last()?.map(|(k, _)| k.value().0);
            let purged = match txn.open_table(META)?.get(LAST_PURGED)? {
                Some(v) => Some(
                    decode::<LogId>(v.value())
                        .map_err(|e| redb::Error::Corrupted(format!("last purged log id: {e}")))?
                        .index,
                ),
                None => None,
            };
            (last.unwrap_or(0), purged)
        };
        let durable = Arc::new(DurableIndex::default());
        durable.update(|d| d.0 = on_disk);
        let db = Arc::new(db);
        let cache: Arc<Mutex<EntryCache>> = Arc::default();
        let (writer, ops) = mpsc::channel();
        let committed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let gate: Arc<StallGate> = Arc::default();
        let (thread_db, thread_cache, thread_committed, thread_gate, thread_durable) = (
            db.clone(),
            cache.clone(),
            committed.clone(),
            gate.clone(),
            durable.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("escrow-raft-log".into())
            .spawn(move || {
                write_loop(
                    &thread_db,
                    &thread_cache,
                    &thread_committed,
                    &metrics,
                    &thread_gate,
                    &thread_durable,
                    ops,
                )
            })
            .map_err(redb::Error::Io)?;
        Ok(LogStore {
            db,
            cache,
            writer: Arc::new(Writer {
                ops: Some(writer),
                thread: Some(thread),
                gate,
            }),
            committed,
            unpurged_from: Arc::new(purged.map_or(0, |p| p + 1).into()),
            durable,
            read_for_bodies: Arc::default(),
        })
    }

    /// The committed entry at `index`, from memory or disk.
    fn committed_entry(&self, index: u64) -> Result<Entry, Failure> {
        if let Some((entry, _, _)) = self.cache().entries.get(&index) {
            return Ok(entry.clone());
        }
        let mut kept = lock(&self.read_for_bodies);
        if let Some(entry) = kept.iter().find(|e| e.log_id.index == index) {
            return Ok(entry.clone());
        }
        let txn = self.db.begin_read().map_err(fail)?;
        let entry = read_entries(&txn.open_table(ENTRIES).map_err(fail)?, &(index..=index))?
            .pop()
            .ok_or_else(|| fail(format!("log entry {index} is not stored")))?;
        kept.push_back(entry.clone());
        let mut bytes: usize = kept.iter().map(entry_bytes).sum();
        while kept.len() > BODY_ENTRIES_KEPT || (bytes > BODY_ENTRIES_KEPT_BYTES && kept.len() > 1)
        {
            if let Some(old) = kept.pop_front() {
                bytes -= entry_bytes(&old);
            }
        }
        Ok(entry)
    }

    /// Holds every log write (and its fsync) while `stalled`, as a hung disk would
    /// (fault injection for tests); entries stay readable from the cache meanwhile.
    pub fn stall_writes(&self, stalled: bool) {
        self.writer.gate.set(stalled);
    }

    /// Observes when the database is closed (every clone and the writer thread gone).
    pub fn closed_watch(&self) -> std::sync::Weak<Database> {
        Arc::downgrade(&self.db)
    }

    fn send(&self, op: Op) -> Result<(), Failure> {
        self.writer
            .ops
            .as_ref()
            .ok_or_else(|| fail("the log writer has stopped"))?
            .send(op)
            .map_err(|_| fail("the log writer has stopped"))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        lock(&self.cache)
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Failure> {
        let txn = self.db.begin_read().map_err(fail)?;
        let table = txn.open_table(META).map_err(fail)?;
        let value = table.get(key).map_err(fail)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// The term of the stored vote and the last log index, as the store holds them now.
    pub async fn vote_term_and_last_index(&self) -> Result<(u64, Option<u64>), StorageError> {
        let mut probe = self.clone();
        let state = probe.get_log_state().await?;
        let vote = probe.read_vote().await?;
        Ok((
            vote.map_or(0, |v| v.leader_id().term),
            state.last_log_id.map(|l| l.index),
        ))
    }

    /// The last committed log id this node has recorded (for status reports).
    pub fn committed(&self) -> Option<LogId> {
        self.read_meta::<Option<LogId>>(COMMITTED)
            .ok()
            .flatten()
            .flatten()
    }

    /// Sends an operation and waits for the writer to make it durable.
    async fn submit(
        &self,
        op: impl FnOnce(mpsc::SyncSender<Result<(), Failure>>) -> Op,
    ) -> Result<(), Failure> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(op(tx))?;
        tokio::task::spawn_blocking(move || rx.recv())
            .await
            .map_err(fail)?
            .map_err(|_| fail("the log writer has stopped"))?
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogBodies for LogStore {
    fn bodies(&self, index: u64, ordinals: &[u32]) -> Result<Vec<Vec<u8>>, String> {
        let entry = self.committed_entry(index).map_err(|e| e.0)?;
        let EntryPayload::Normal(batch) = &entry.payload else {
            return Err(format!("log entry {index} carries no messages"));
        };
        let bodies: Vec<&[u8]> = batch.bodies().collect();
        ordinals
            .iter()
            .map(|&o| {
                bodies.get(o as usize).map(|b| b.to_vec()).ok_or_else(|| {
                    format!(
                        "log entry {index} has {} bodies, none at position {o}",
                        bodies.len()
                    )
                })
            })
            .collect()
    }

    fn wait_durable(&self, index: u64) -> Result<(), String> {
        self.durable.wait_for(index)
    }
}

/// The writer thread: group-commits every queued operation, in order, with one fsync.
fn write_loop(
    db: &Database,
    cache: &Mutex<EntryCache>,
    committed: &Mutex<Option<Vec<u8>>>,
    metrics: &Metrics,
    gate: &StallGate,
    durable_index: &DurableIndex,
    ops: mpsc::Receiver<Op>,
) {
    // Entries are encoded here before being cut in chunks; reusing one buffer spares an
    // allocation of the entry's size (fresh pages, for large ones) per entry. It keeps
    // the capacity of the largest entry, which a proposer batch bounds (8 MiB of bodies).
    let mut scratch = Vec::new();
    let mut hint_written: Option<std::time::Instant> = None;
    while let Ok(first) = ops.recv() {
        gate.wait_open();
        let mut batch = vec![first];
        while let Ok(op) = ops.try_recv() {
            batch.push(op);
            if batch.len() >= 1024 {
                break;
            }
        }
        // Due by time, or free when the batch writes the meta table anyway.
        let hint_due = hint_written.is_none_or(|t| t.elapsed() >= COMMITTED_HINT_EVERY)
            || batch.iter().any(|op| !matches!(op, Op::Append(..)));
        if hint_due {
            if let Some(bytes) = committed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                batch.push(Op::Meta(COMMITTED, bytes, None));
                hint_written = Some(std::time::Instant::now());
            }
        }
        let result = write_batch(db, &batch, &mut scratch);
        if result.is_ok() {
            metrics.fsyncs.fetch_add(1, Relaxed);
        }
        let durable = batch
            .iter()
            .filter_map(|op| match op {
                Op::Append(_, append, _) => Some(*append),
                _ => None,
            })
            .max();
        if let (Ok(()), Some(append)) = (&result, durable) {
            let mut c = lock(cache);
            c.durable = c.durable.max(append);
            c.evict();
        }
        if result.is_ok() {
            durable_index.after_write(&batch);
        }
        for op in batch {
            let outcome = result.as_ref().map(|_| ()).map_err(|e| fail(&e.0));
            match op {
                Op::Append(_, _, callback) => {
                    callback.log_io_completed(outcome.map_err(|e| std::io::Error::other(e.0)))
                }
                Op::Truncate(_, done) | Op::Purge(_, done) | Op::Meta(_, _, Some(done)) => {
                    let _ = done.send(outcome);
                }
                Op::Meta(_, _, None) => {}
            }
        }
    }
    durable_index.update(|(_, stopped)| *stopped = true);
    // The store is closing: keep the latest hint for the next start.
    if let Some(bytes) = committed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = write_batch(db, &[Op::Meta(COMMITTED, bytes, None)], &mut scratch);
    }
}

fn write_batch(db: &Database, batch: &[Op], scratch: &mut Vec<u8>) -> Result<(), Failure> {
    let txn = db.begin_write().map_err(fail)?;
    {
        let mut entries = txn.open_table(ENTRIES).map_err(fail)?;
        let mut meta = txn.open_table(META).map_err(fail)?;
        for op in batch {
            match op {
                Op::Append(list, _, _) => {
                    for entry in list {
                        put_entry(&mut entries, entry, scratch)?;
                    }
                }
                Op::Truncate(from, _) => {
                    entries
                        .retain_in((*from, 0).., |_, _| false)
                        .map_err(fail)?;
                }
                Op::Purge(upto, _) => {
                    // Entries stay: the state machine reads message bodies from them.
                    meta.insert(LAST_PURGED, encode(upto)?.as_slice())
                        .map_err(fail)?;
                }
                Op::Meta(key, value, _) => {
                    meta.insert(*key, value.as_slice()).map_err(fail)?;
                }
            }
        }
    }
    txn.commit().map_err(fail)
}

/// Stores one entry, cut in chunks of at most [`CHUNK_BYTES`].
fn put_entry(
    entries: &mut redb::Table<'_, (u64, u32), &'static [u8]>,
    entry: &Entry,
    scratch: &mut Vec<u8>,
) -> Result<(), Failure> {
    scratch.clear();
    *scratch = postcard::to_extend(entry, std::mem::take(scratch)).map_err(fail)?;
    for (chunk, piece) in (0u32..).zip(scratch.chunks(CHUNK_BYTES)) {
        entries
            .insert((entry.log_id.index, chunk), piece)
            .map_err(fail)?;
    }
    Ok(())
}

/// Decodes the entries with indexes in `range`, joining their chunks.
fn read_entries(
    table: &impl ReadableTable<(u64, u32), &'static [u8]>,
    range: &impl RangeBounds<u64>,
) -> Result<Vec<Entry>, Failure> {
    let start = match range.start_bound() {
        Bound::Included(&s) => Bound::Included((s, 0)),
        Bound::Excluded(&s) => Bound::Excluded((s, u32::MAX)),
        Bound::Unbounded => Bound::Unbounded,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => Bound::Included((e, u32::MAX)),
        Bound::Excluded(&e) => Bound::Excluded((e, 0)),
        Bound::Unbounded => Bound::Unbounded,
    };
    let mut out = Vec::new();
    // (index, next chunk expected, bytes so far)
    let mut pending: Option<(u64, u32, Vec<u8>)> = None;
    for item in table.range::<(u64, u32)>((start, end)).map_err(fail)? {
        let (key, value) = item.map_err(fail)?;
        let (index, chunk) = key.value();
        match &mut pending {
            Some((at, next, bytes)) if *at == index && *next == chunk => {
                bytes.extend_from_slice(value.value());
                *next += 1;
            }
            _ if chunk == 0 => {
                if let Some((_, _, bytes)) = pending.take() {
                    out.push(decode(&bytes)?);
                }
                pending = Some((index, 1, value.value().to_vec()));
            }
            _ => {
                return Err(fail(format!(
                    "log entry {index}: chunk {chunk} out of order"
                )))
            }
        }
    }
    if let Some((_, _, bytes)) = pending {
        out.push(decode(&bytes)?);
    }
    Ok(out)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        if let Some(entries) = self.cache().get(&range) {
            return Ok(entries);
        }
        let read = || -> Result<Vec<Entry>, Failure> {
            let txn = self.db.begin_read().map_err(fail)?;
            let mut entries = read_entries(&txn.open_table(ENTRIES).map_err(fail)?, &range)?;
            let unpurged_from = self.unpurged_from.load(Relaxed);
            entries.retain(|e| e.log_id.index >= unpurged_from);
            Ok(entries)
        };
        read().map_err(|e| logs_err(ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let state = || -> Result<LogState<TypeConfig>, Failure> {
            let last_purged_log_id: Option<LogId> = self.read_meta(LAST_PURGED)?;
            let txn = self.db.begin_read().map_err(fail)?;
            let table = txn.open_table(ENTRIES).map_err(fail)?;
            let last_index = table.last().map_err(fail)?.map(|(key, _)| key.value().0);
            let on_disk = match last_index {
                Some(index) => read_entries(&table, &(index..=index))?
                    .pop()
                    .map(|e| e.log_id),
                None => None,
            };
            let last = self.cache().last().max(on_disk);
            // Entries up to the purge mark stay stored (message bodies), but Raft's log
            // starts after it: a snapshot installed beyond the last entry moves it there.
            let last_log_id = match (last, last_purged_log_id) {
                (Some(l), Some(p)) if l.index <= p.index => Some(p),
                (l, p) => l.or(p),
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        };
        state().map_err(|e| logs_err(ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let bytes = encode(vote).map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, &e))?;
        self.submit(|done| Op::Meta(VOTE, bytes, Some(done)))
            .await
            .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, &e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_meta(VOTE)
            .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Read, &e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint for faster restarts: rides along with the next write, nobody waits.
        let bytes =
            encode(&committed).map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, &e))?;
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(COMMITTED)
            .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Read, &e))?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut cache = self.cache();
        cache.submitted += 1;
        let append = cache.submitted;
        for entry in &entries {
            cache.insert(entry.clone(), append);
        }
        // Readable now (from the cache); the callback fires after the writer's fsync.
        // Queued under the cache lock, so appends reach the writer in their numbers' order.
        self.send(Op::Append(entries, append, callback))
            .map_err(|e| logs_err(ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut cache = self.cache();
            cache.remove(log_id.index..);
        }
        lock(&self.read_for_bodies).retain(|e| e.log_id.index < log_id.index);
        self.submit(|done| Op::Truncate(log_id.index, done))
            .await
            .map_err(|e| logs_err(ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.unpurged_from.fetch_max(log_id.index + 1, Relaxed);
        self.cache().remove(..=log_id.index);
        self.submit(|done| Op::Purge(log_id, done))
            .await
            .map_err(|e| logs_err(ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::Batch;
    use escrow_proto::Message;
    use redb::ReadableTableMetadata;

    fn entry(index: u64, body_bytes: usize) -> Entry {
        let batch = Batch {
            at_ms: index,
            commands: vec![Command::Append {
                topic: "t".into(),
                producer: None,
                records: vec![(
                    0,
                    Message::new(format!("m{index}"), vec![index as u8; body_bytes]),
                )],
                dedupe_by_id: false,
            }],
        };
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Arc::new(batch)),
        }
    }

    fn log_id(index: u64) -> Option<LogId> {
        Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 1),
            index,
        ))
    }

    #[tokio::test]
    async fn the_committed_hint_rides_with_a_meta_write_and_is_kept_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let metrics = Arc::new(Metrics::default());
        let mut store = LogStore::open(&path, metrics.clone()).unwrap();
        store.save_committed(log_id(7)).await.unwrap();
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), log_id(7));
        // Not due yet by time: it waits for a later write, or the close.
        store.save_committed(log_id(9)).await.unwrap();
        drop(store);
        let mut reopened = LogStore::open(&path, metrics).unwrap();
        assert_eq!(reopened.read_committed().await.unwrap(), log_id(9));
    }

    #[test]
    fn the_cache_bound_counts_half_message_bodies() {
        let half = Command::SendHalf {
            half: Box::new(crate::state::command::HalfMessage {
                topic: "t".into(),
                queue: 0,
                producer_group: "g".into(),
                instance: "i".into(),
                message: Message::new("h", vec![7; 100_000]),
            }),
            first_check_at_ms: 0,
        };
        let mut cache = EntryCache::default();
        for index in 1..=1000 {
            cache.insert(
                Entry {
                    log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
                    payload: EntryPayload::Normal(Arc::new(Batch {
                        at_ms: index,
                        commands: vec![half.clone()],
                    })),
                },
                1,
            );
        }
        assert!(
            cache.bytes >= 1000 * 100_000,
            "counted {} bytes",
            cache.bytes
        );
        cache.durable = 1;
        cache.evict();
        assert!(cache.bytes <= CACHE_MAX_BYTES, "kept {} bytes", cache.bytes);
        assert!(cache.entries.len() < 1000);
    }

    #[test]
    fn entries_that_replaced_truncated_ones_stay_cached_until_their_own_write() {
        let big = CACHE_MAX_BYTES / 4;
        let mut cache = EntryCache::default();
        // Append 1 (entries 1..=4) is queued; a new leader truncates from 3 and append 2
        // brings other entries 3 and 4 before the writer finishes append 1.
        for index in 1..=4 {
            cache.insert(entry(index, big), 1);
        }
        cache.remove(3..);
        for index in 3..=6 {
            cache.insert(entry(index, big), 2);
        }
        cache.durable = 1;
        cache.evict();
        let kept: Vec<u64> = cache.entries.keys().copied().collect();
        assert_eq!(
            kept,
            vec![3, 4, 5, 6],
            "entries not yet written must not be evicted (a read would go to the disk, \
             which holds the old entries or none)"
        );
        cache.durable = 2;
        cache.evict();
        assert!(cache.bytes <= CACHE_MAX_BYTES);
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[test]
    fn entries_larger_than_a_chunk_round_trip_and_truncate_and_a_purge_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("log.redb")).unwrap();
        // Small, exactly one chunk, several chunks and a large one, alternating.
        let sizes = [
            10,
            CHUNK_BYTES,
            3 * CHUNK_BYTES + 5,
            100,
            200_000,
            1,
            40_000,
        ];
        let written: Vec<Entry> = (1..).zip(sizes).map(|(i, n)| entry(i, n)).collect();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(ENTRIES).unwrap();
            for e in &written {
                put_entry(&mut table, e, &mut Vec::new()).unwrap();
            }
            assert!(
                table.len().unwrap() > written.len() as u64 + 10,
                "large entries are cut"
            );
        }
        txn.commit().unwrap();

        let read = |range: std::ops::RangeInclusive<u64>| {
            let txn = db.begin_read().unwrap();
            read_entries(&txn.open_table(ENTRIES).unwrap(), &range).unwrap()
        };
        let all = read(0..=u64::MAX);
        assert_eq!(indexes(&all), (1..=7).collect::<Vec<_>>());
        for (got, want) in all.iter().zip(&written) {
            assert_eq!(encode(got).unwrap(), encode(want).unwrap());
        }
        assert_eq!(indexes(&read(3..=5)), vec![3, 4, 5]);
        assert_eq!(indexes(&read(5..=5)), vec![5]);

        let (tx, rx) = mpsc::sync_channel(2);
        let ops = [
            Op::Truncate(6, tx.clone()),
            Op::Purge(written[1].log_id, tx),
        ];
        write_batch(&db, &ops, &mut Vec::new()).unwrap();
        drop(rx);
        // A purge keeps the entries (message bodies are read from them).
        assert_eq!(indexes(&read(0..=u64::MAX)), vec![1, 2, 3, 4, 5]);
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(ENTRIES).unwrap();
        let last = table.last().unwrap().map(|(k, _)| k.value().0);
        assert_eq!(last, Some(5), "no chunk of a truncated entry stays");
        let purged: LogId = decode(
            txn.open_table(META)
                .unwrap()
                .get(LAST_PURGED)
                .unwrap()
                .unwrap()
                .value(),
        )
        .unwrap();
        assert_eq!(purged, written[1].log_id);
    }

    fn append(topic: &str, records: &[(u32, &str, usize)]) -> Command {
        Command::Append {
            topic: topic.into(),
            producer: None,
            records: records
                .iter()
                .map(|&(q, id, len)| (q, Message::new(id, vec![id.as_bytes()[0]; len])))
                .collect(),
            dedupe_by_id: false,
        }
    }

    fn normal(index: u64, commands: Vec<Command>) -> Entry {
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Arc::new(Batch {
                at_ms: index,
                commands,
            })),
        }
    }

    /// A log store opened on a file that holds `entries`, durably, as its writer leaves them.
    fn log_holding(path: &Path, entries: &[Entry]) -> LogStore {
        {
            let db = Database::create(path).unwrap();
            let txn = db.begin_write().unwrap();
            let mut table = txn.open_table(ENTRIES).unwrap();
            for e in entries {
                put_entry(&mut table, e, &mut Vec::new()).unwrap();
            }
            drop(table);
            txn.commit().unwrap();
        }
        LogStore::open(path, Arc::new(Metrics::default())).unwrap()
    }

    fn half(id: &str, len: usize) -> Command {
        Command::SendHalf {
            half: Box::new(crate::state::command::HalfMessage {
                topic: "t".into(),
                queue: 0,
                producer_group: "g".into(),
                instance: "i".into(),
                message: Message::new(id, vec![id.as_bytes()[0]; len]),
            }),
            first_check_at_ms: u64::MAX,
        }
    }

    /// Applied bodies (published, and of half messages pending or committed) are read
    /// back from the log, with the state machine's ordinals matching `Batch::bodies`
    /// through refused appends and `Each`; a snapshot carries them inline to a node
    /// without that log.
    #[tokio::test]
    async fn published_bodies_are_read_from_the_log_and_snapshots_carry_them() {
        use crate::raft::state_machine::StateMachineStore;
        use crate::state::StateMachine;
        use crate::storage::Store;
        use openraft::storage::RaftStateMachine;
        use openraft::RaftSnapshotBuilder;

        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("raft-log.redb");
        let entries = vec![
            normal(
                1,
                vec![Command::CreateTopic {
                    name: "t".into(),
                    queues: 2,
                }],
            ),
            normal(
                2,
                vec![
                    append("t", &[(0, "a", 3000), (1, "b", 10)]),
                    append("missing", &[(0, "x", 50)]),
                    half("h1", 700),
                    Command::Each(vec![
                        append("t", &[(1, "c", 20_000)]),
                        Command::Each(vec![append("t", &[(0, "y", 5)])]),
                        append("t", &[(9, "z", 5)]),
                        half("pending", 900),
                        append("t", &[(0, "d", 1)]),
                    ]),
                ],
            ),
            normal(
                3,
                vec![Command::EndTxn {
                    txn_id: 1,
                    commit: true,
                }],
            ),
        ];
        let log = log_holding(&log_path, &entries);
        log.wait_durable(3).unwrap();
        let store = Arc::new(Store::open(&dir.path().join("state.redb")).unwrap());
        store.attach_log(Arc::new(log.clone()));
        let mut sm = StateMachineStore::new(StateMachine::open(store.clone()).unwrap()).unwrap();
        let replies = sm.apply(entries.clone()).await.unwrap();
        assert!(
            format!("{:?}", replies[1]).contains("Rejected"),
            "the unknown topic and the nested Each are refused: {replies:?}"
        );
        let expect = |store: &Store| {
            let bodies = |queue, offsets: &[u64]| -> Vec<(String, Vec<u8>)> {
                store
                    .read(1, queue, offsets)
                    .unwrap()
                    .into_iter()
                    .map(|(_, _, r)| {
                        assert_eq!(r.body_in_log, None);
                        (r.message.id, r.message.body)
                    })
                    .collect()
            };
            assert_eq!(
                bodies(0, &[0, 1, 2]),
                vec![
                    ("a".into(), vec![b'a'; 3000]),
                    ("d".into(), vec![b'd'; 1]),
                    ("h1".into(), vec![b'h'; 700]),
                ]
            );
            let pending = store.read_half(2).unwrap().expect("pending half message");
            assert_eq!(pending.message.body, vec![b'p'; 900]);
            assert_eq!(pending.body_in_log, None);
            assert_eq!(
                bodies(1, &[0, 1]),
                vec![
                    ("b".into(), vec![b'b'; 10]),
                    ("c".into(), vec![b'c'; 20_000])
                ]
            );
        };
        expect(&store);
        let (_, _, meta) = store.read_without_bodies(1, 0, &[0]).unwrap().remove(0);
        assert_eq!(meta.message.id, "a");
        assert!(
            meta.message.body.is_empty(),
            "metadata readers leave the body in the log"
        );
        assert_eq!(
            meta.body_in_log.map(|at| (at.index, at.len)),
            Some((2, 3000))
        );
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let other = tempfile::tempdir().unwrap();
        let fresh = Store::open(&other.path().join("state.redb")).unwrap();
        fresh.import(snapshot.snapshot.get_ref()).unwrap();
        expect(&fresh);
        assert!(
            snapshot.snapshot.get_ref().len() > 23_000,
            "the image carries the bodies"
        );
    }

    /// Random batches applied twice, bodies in the log and bodies inline, must store the
    /// same messages: a differential check of the ordinals through every command kind.
    #[tokio::test]
    async fn bodies_in_the_log_read_back_as_bodies_stored_inline() {
        use crate::raft::state_machine::StateMachineStore;
        use crate::state::StateMachine;
        use crate::storage::Store;
        use openraft::storage::RaftStateMachine;
        use openraft::RaftSnapshotBuilder;

        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let topics = ["t", "t", "u", "missing"];
        let mut message_id = 0;
        let mut command = |next: &mut dyn FnMut(u64) -> u64| -> Command {
            let topic = topics[next(4) as usize].to_string();
            message_id += 1;
            let message = |next: &mut dyn FnMut(u64) -> u64| {
                // Repeated ids now and then, for publishes deduplicated by id.
                let id = format!("m{}", message_id + next(3));
                let len = [0, 1, 100, 1500, 20_000][next(5) as usize];
                Message::new(id, vec![next(256) as u8; len])
            };
            match next(6) {
                0 | 1 => Command::Append {
                    topic,
                    producer: None,
                    records: (0..1 + next(4))
                        .map(|_| ([0, 1, 2, 0, 0, 9][next(6) as usize], message(next)))
                        .collect(),
                    dedupe_by_id: next(2) == 0,
                },
                2 => Command::SendHalf {
                    half: Box::new(crate::state::command::HalfMessage {
                        topic,
                        queue: [0, 1, 2, 0, 0, 9][next(6) as usize],
                        producer_group: "g".into(),
                        instance: "i".into(),
                        message: message(next),
                    }),
                    first_check_at_ms: u64::MAX,
                },
                3 => Command::EndTxn {
                    txn_id: 1 + next(48),
                    commit: next(3) != 0,
                },
                4 => Command::AbandonTxns {
                    txn_ids: vec![1 + next(48)],
                },
                _ => Command::DeadLetter {
                    topic,
                    group: "dg".into(),
                    offsets: vec![(0, next(3))],
                    records: vec![(0, message(next))],
                },
            }
        };
        let mut entries = vec![normal(
            1,
            vec![
                Command::CreateTopic {
                    name: "t".into(),
                    queues: 3,
                },
                Command::CreateTopic {
                    name: "u".into(),
                    queues: 1,
                },
            ],
        )];
        for index in 2..80 {
            let mut commands = Vec::new();
            for _ in 0..1 + next(6) {
                commands.push(match next(5) {
                    0 => Command::Each(
                        (0..1 + next(3))
                            .map(|_| match next(4) {
                                0 => Command::Each(vec![command(&mut next)]),
                                _ => command(&mut next),
                            })
                            .collect(),
                    ),
                    _ => command(&mut next),
                });
            }
            entries.push(normal(index, commands));
        }

        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("raft-log.redb");
        let log = log_holding(&log_path, &entries);
        let in_log = Arc::new(Store::open(&dir.path().join("in-log.redb")).unwrap());
        in_log.attach_log(Arc::new(log.clone()));
        let inline = Arc::new(Store::open(&dir.path().join("inline.redb")).unwrap());
        let mut a = StateMachineStore::new(StateMachine::open(in_log.clone()).unwrap()).unwrap();
        let mut b = StateMachineStore::new(StateMachine::open(inline.clone()).unwrap()).unwrap();
        for entry in &entries {
            let from_log = a.apply(vec![entry.clone()]).await.unwrap();
            let stored_inline = b.apply(vec![entry.clone()]).await.unwrap();
            assert_eq!(from_log, stored_inline, "entry {}", entry.log_id.index);
        }
        let snapshot = a
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let from_snapshot = Store::open(&dir.path().join("snapshot.redb")).unwrap();
        from_snapshot.import(snapshot.snapshot.get_ref()).unwrap();

        let everything = |store: &Store| {
            let mut out = Vec::new();
            for (name, topic, ends) in store.load().unwrap().topics {
                for (queue, end) in (0u32..).zip(ends) {
                    let offsets: Vec<u64> = (0..end).collect();
                    for (offset, _, record) in store.read(topic.id, queue, &offsets).unwrap() {
                        assert_eq!(record.body_in_log, None);
                        out.push((name.clone(), queue, offset, record));
                    }
                }
            }
            let halves: Vec<_> = (1..=64).map(|id| store.read_half(id).unwrap()).collect();
            (out, halves)
        };
        let expected = everything(&inline);
        assert!(
            expected.0.len() > 40 && expected.0.iter().any(|(n, ..)| n.starts_with("%")),
            "the batches store messages, dead letters or abandoned ones among them: {}",
            expected.0.len()
        );
        let pending = expected.1.iter().flatten().count();
        assert!(
            pending > 0 && pending < 40,
            "some halves pending: {pending}"
        );
        assert_eq!(everything(&in_log), expected, "bodies read from the log");
        assert_eq!(
            everything(&from_snapshot),
            expected,
            "bodies from the snapshot"
        );
    }

    /// A durable state commit relies on this wait (G2): it must hold until the writer
    /// reaches the index, see a truncation, and fail rather than hang once it stops.
    #[test]
    fn a_wait_for_durable_entries_follows_the_writer() {
        let durable = Arc::new(DurableIndex::default());
        durable.update(|d| d.0 = 3);
        assert_eq!(durable.wait_for(3), Ok(()), "already durable");
        let writer = durable.clone();
        let ahead = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let (tx, _rx) = mpsc::sync_channel(1);
            // A truncation first: entries from 2 on are gone, 3 is no longer durable.
            writer.after_write(&[Op::Truncate(2, tx)]);
            assert_eq!(writer.state.lock().unwrap().0, 1);
            writer.update(|d| d.0 = 5);
        });
        let started = std::time::Instant::now();
        assert_eq!(durable.wait_for(5), Ok(()));
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(100),
            "it waited"
        );
        ahead.join().unwrap();
        durable.update(|d| d.1 = true);
        assert!(
            durable.wait_for(6).is_err(),
            "a stopped writer ends the wait"
        );
    }

    #[test]
    fn a_missing_chunk_is_an_error_not_a_wrong_entry() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("log.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(ENTRIES).unwrap();
            put_entry(&mut table, &entry(1, 3 * CHUNK_BYTES), &mut Vec::new()).unwrap();
            table.remove((1, 1)).unwrap();
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(ENTRIES).unwrap();
        assert!(read_entries(&table, &(0..=u64::MAX)).is_err());
    }
}
