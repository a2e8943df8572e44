//! The Raft log and vote on redb (`raft-log.redb`).
//!
//! Tables: `entries` (log index -> postcard entry) and `meta` (vote, committed,
//! last purged). Every append is one write transaction with one fsync, however many
//! entries it carries; the callback fires after the fsync.

use super::{io_error, Entry, LogId, StorageError, TypeConfig};
use crate::metrics::Metrics;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Log storage; clones share the database.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Database>,
    metrics: Arc<Metrics>,
}

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
    postcard::to_allocvec(value).map_err(fail)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    postcard::from_bytes(bytes).map_err(fail)
}

impl LogStore {
    /// Opens or creates the log at `path`.
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<LogStore, redb::Error> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(ENTRIES)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LogStore {
            db: Arc::new(db),
            metrics,
        })
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Failure> {
        let txn = self.db.begin_read().map_err(fail)?;
        let table = txn.open_table(META).map_err(fail)?;
        let value = table.get(key).map_err(fail)?;
        value.map(|v| decode(v.value())).transpose()
    }

    fn write_meta<T: Serialize>(&self, key: &str, value: &T, durable: bool) -> Result<(), Failure> {
        let bytes = encode(value)?;
        let mut txn = self.db.begin_write().map_err(fail)?;
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(fail)?;
        }
        txn.open_table(META)
            .map_err(fail)?
            .insert(key, bytes.as_slice())
            .map_err(fail)?;
        txn.commit().map_err(fail)?;
        if durable {
            self.metrics.fsyncs.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// The last committed log id this node has recorded (for status reports).
    pub fn committed(&self) -> Option<LogId> {
        self.read_meta::<Option<LogId>>(COMMITTED)
            .ok()
            .flatten()
            .flatten()
    }

    fn append_blocking(&self, entries: Vec<Entry>) -> Result<(), Failure> {
        let txn = self.db.begin_write().map_err(fail)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(fail)?;
            for entry in &entries {
                table
                    .insert(entry.log_id.index, encode(entry)?.as_slice())
                    .map_err(fail)?;
            }
        }
        txn.commit().map_err(fail)?;
        self.metrics.fsyncs.fetch_add(1, Relaxed);
        Ok(())
    }

    fn remove_range(
        &self,
        range: impl RangeBounds<u64>,
        purged: Option<&LogId>,
    ) -> Result<(), Failure> {
        let txn = self.db.begin_write().map_err(fail)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(fail)?;
            table.retain_in(range, |_, _| false).map_err(fail)?;
            if let Some(log_id) = purged {
                txn.open_table(META)
                    .map_err(fail)?
                    .insert(LAST_PURGED, encode(log_id)?.as_slice())
                    .map_err(fail)?;
            }
        }
        txn.commit().map_err(fail)?;
        self.metrics.fsyncs.fetch_add(1, Relaxed);
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let read = || -> Result<Vec<Entry>, Failure> {
            let txn = self.db.begin_read().map_err(fail)?;
            let table = txn.open_table(ENTRIES).map_err(fail)?;
            let mut out = Vec::new();
            for item in table.range(range.clone()).map_err(fail)? {
                let (_, value) = item.map_err(fail)?;
                out.push(decode(value.value())?);
            }
            Ok(out)
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
            let last = match table.last().map_err(fail)? {
                Some((_, value)) => Some(decode::<Entry>(value.value())?.log_id),
                None => None,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.or(last_purged_log_id),
            })
        };
        state().map_err(|e| logs_err(ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote, true)
            .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, &e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_meta(VOTE)
            .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Read, &e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint for faster restart; it becomes durable with the next append.
        self.write_meta(COMMITTED, &committed, false)
            .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, &e))
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
        let store = self.clone();
        // The fsync runs off the async workers; the entries are readable once this returns.
        let result = tokio::task::spawn_blocking(move || store.append_blocking(entries))
            .await
            .map_err(fail)
            .and_then(|r| r);
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.0.clone())));
                Err(logs_err(ErrorVerb::Write, e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.remove_range(log_id.index.., None)
            .map_err(|e| logs_err(ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.remove_range(..=log_id.index, Some(&log_id))
            .map_err(|e| logs_err(ErrorVerb::Delete, e))
    }
}
