//! The embedded store: outbox and inbox tables inside the application's own redb file.
//!
//! Tables (fixed names, beside the application's own):
//! - `escrow_outbox_rows`: row id → encoded row (topic, key, headers, body, created_at,
//!   attempts, last_error);
//! - `escrow_outbox_pending`: row id → time of its next attempt (ms; 0 = now);
//! - `escrow_outbox_sent`: row id → when it was sent (ms), until the cleaner deletes it;
//! - `escrow_outbox_parked`: row id → when it was parked (ms);
//! - `escrow_outbox_meta`: `next_id`, so ids are never reused after the cleaner runs;
//! - `escrow_inbox`: message id → when it was processed (ms).
//!
//! redb has one writer at a time, so ids are assigned in commit order. A redb file belongs
//! to one process, so the relay runs in it; its workers share an in-memory set of claimed
//! rows instead of row locks.

use crate::relay::{ClaimWorker, Claimed, RelayStore};
use crate::{
    now_ms, InboxError, NewMessage, OutboxError, OutboxRow, OutboxStatus, ParkedRow, Processed,
    RowFailure,
};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("escrow_outbox_rows");
const PENDING: TableDefinition<u64, u64> = TableDefinition::new("escrow_outbox_pending");
const SENT: TableDefinition<u64, u64> = TableDefinition::new("escrow_outbox_sent");
const PARKED: TableDefinition<u64, u64> = TableDefinition::new("escrow_outbox_parked");
const META: TableDefinition<&str, u64> = TableDefinition::new("escrow_outbox_meta");
const INBOX: TableDefinition<&str, u64> = TableDefinition::new("escrow_inbox");

/// A row as stored (postcard); fields are only ever appended.
#[derive(Debug, Serialize, Deserialize)]
struct StoredRow {
    topic: String,
    key: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    created_at_ms: u64,
    attempts: u32,
    last_error: Option<String>,
}

fn decode(id: u64, bytes: &[u8]) -> Result<StoredRow, OutboxError> {
    postcard::from_bytes(bytes).map_err(|e| OutboxError::Corrupt {
        id,
        reason: e.to_string(),
    })
}

fn encode(id: u64, row: &StoredRow) -> Result<Vec<u8>, OutboxError> {
    postcard::to_allocvec(row).map_err(|e| OutboxError::Corrupt {
        id,
        reason: e.to_string(),
    })
}

/// An outbox in a redb database the application also keeps its data in.
#[derive(Clone, Debug)]
pub struct RedbOutbox {
    db: Arc<Database>,
    prefix: String,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    claimed: Mutex<HashSet<u64>>,
    wake: watch::Sender<u64>,
    cleaning: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves a usable set; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedbOutbox {
    /// An outbox in `db`; message ids are `<prefix>-<row id>` (give a new file a new prefix
    /// if the old file's ids may still be in the broker's dedup window).
    pub fn new(db: Arc<Database>, prefix: impl Into<String>) -> Result<RedbOutbox, OutboxError> {
        let prefix = prefix.into();
        if prefix.is_empty() || prefix.len() > 100 {
            return Err(OutboxError::Invalid(
                "message id prefix must be 1..=100 bytes".into(),
            ));
        }
        // Create the tables so readers never meet a missing one.
        let tx = db.begin_write().map_err(OutboxError::redb)?;
        tx.open_table(ROWS).map_err(OutboxError::redb)?;
        for t in [PENDING, SENT, PARKED] {
            tx.open_table(t).map_err(OutboxError::redb)?;
        }
        tx.open_table(META).map_err(OutboxError::redb)?;
        tx.commit().map_err(OutboxError::redb)?;
        Ok(RedbOutbox {
            db,
            prefix,
            shared: Arc::new(Shared {
                claimed: Mutex::new(HashSet::new()),
                wake: watch::channel(0).0,
                cleaning: Mutex::new(()),
            }),
        })
    }

    /// The database.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// Writes `message` as a pending row in the caller's write transaction (commit it with
    /// the business data); returns the row id. Call [`RedbOutbox::wake`] after the commit.
    pub fn enqueue(&self, tx: &WriteTransaction, message: &NewMessage) -> Result<u64, OutboxError> {
        let mut meta = tx.open_table(META).map_err(OutboxError::redb)?;
        let id = meta
            .get("next_id")
            .map_err(OutboxError::redb)?
            .map_or(1, |v| v.value());
        meta.insert("next_id", id + 1).map_err(OutboxError::redb)?;
        let row = StoredRow {
            topic: message.topic.clone(),
            key: message.key.clone(),
            headers: message
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            body: message.body.clone(),
            created_at_ms: now_ms(),
            attempts: 0,
            last_error: None,
        };
        let bytes = encode(id, &row)?;
        tx.open_table(ROWS)
            .map_err(OutboxError::redb)?
            .insert(id, bytes.as_slice())
            .map_err(OutboxError::redb)?;
        tx.open_table(PENDING)
            .map_err(OutboxError::redb)?
            .insert(id, 0)
            .map_err(OutboxError::redb)?;
        Ok(id)
    }

    /// Rows claimed by relay workers right now (being published).
    pub fn claimed(&self) -> usize {
        lock(&self.shared.claimed).len()
    }

    /// Tells an in-process relay that rows were committed (else it finds them at its next poll).
    pub fn wake(&self) {
        self.shared.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Backlog, lag, publish rate and parked rows.
    pub fn status_now(&self) -> Result<OutboxStatus, OutboxError> {
        let now = now_ms();
        let tx = self.db.begin_read().map_err(OutboxError::redb)?;
        let rows = tx.open_table(ROWS).map_err(OutboxError::redb)?;
        let pending = tx.open_table(PENDING).map_err(OutboxError::redb)?;
        let sent = tx.open_table(SENT).map_err(OutboxError::redb)?;
        let parked = tx.open_table(PARKED).map_err(OutboxError::redb)?;
        let mut lag_ms = 0;
        if let Some((id, _)) = pending.first().map_err(OutboxError::redb)? {
            if let Some(bytes) = rows.get(id.value()).map_err(OutboxError::redb)? {
                let row = decode(id.value(), bytes.value())?;
                lag_ms = now.saturating_sub(row.created_at_ms);
            }
        }
        let mut sent_last_minute = 0;
        for entry in sent.iter().map_err(OutboxError::redb)?.rev() {
            let (_, at) = entry.map_err(OutboxError::redb)?;
            if at.value() + 60_000 < now {
                break;
            }
            sent_last_minute += 1;
        }
        let mut parked_rows = Vec::new();
        for entry in parked.iter().map_err(OutboxError::redb)?.take(10) {
            let (id, _) = entry.map_err(OutboxError::redb)?;
            let id = id.value();
            if let Some(bytes) = rows.get(id).map_err(OutboxError::redb)? {
                let row = decode(id, bytes.value())?;
                parked_rows.push(ParkedRow {
                    id,
                    topic: row.topic,
                    key: row.key,
                    attempts: row.attempts,
                    last_error: row.last_error.unwrap_or_default(),
                });
            }
        }
        Ok(OutboxStatus {
            pending: pending.len().map_err(OutboxError::redb)?,
            parked: parked.len().map_err(OutboxError::redb)?,
            sent_retained: sent.len().map_err(OutboxError::redb)?,
            sent_last_minute,
            lag_ms,
            parked_rows,
        })
    }

    /// Makes parked rows pending again; returns how many.
    pub fn retry_parked(&self) -> Result<u64, OutboxError> {
        let tx = self.db.begin_write().map_err(OutboxError::redb)?;
        let mut n = 0;
        {
            let mut parked = tx.open_table(PARKED).map_err(OutboxError::redb)?;
            let mut pending = tx.open_table(PENDING).map_err(OutboxError::redb)?;
            let mut rows = tx.open_table(ROWS).map_err(OutboxError::redb)?;
            let ids: Vec<u64> = parked
                .iter()
                .map_err(OutboxError::redb)?
                .map(|e| e.map(|(id, _)| id.value()))
                .collect::<Result<_, _>>()
                .map_err(OutboxError::redb)?;
            for id in ids {
                parked.remove(id).map_err(OutboxError::redb)?;
                let stored = match rows.get(id).map_err(OutboxError::redb)? {
                    Some(bytes) => Some(decode(id, bytes.value())?),
                    None => None,
                };
                if let Some(mut row) = stored {
                    row.attempts = 0;
                    rows.insert(id, encode(id, &row)?.as_slice())
                        .map_err(OutboxError::redb)?;
                }
                pending.insert(id, 0).map_err(OutboxError::redb)?;
                n += 1;
            }
        }
        tx.commit().map_err(OutboxError::redb)?;
        self.wake();
        Ok(n)
    }

    fn clean_now(&self, retention: Duration, batch: usize) -> Result<u64, OutboxError> {
        let Ok(_only_cleaner) = self.shared.cleaning.try_lock() else {
            return Ok(0);
        };
        let cutoff =
            now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let mut total = 0;
        loop {
            let tx = self.db.begin_write().map_err(OutboxError::redb)?;
            let deleted;
            {
                let mut sent = tx.open_table(SENT).map_err(OutboxError::redb)?;
                let mut rows = tx.open_table(ROWS).map_err(OutboxError::redb)?;
                let mut old = Vec::new();
                // Sent times roughly follow ids; look a bounded distance past the batch.
                for entry in sent
                    .iter()
                    .map_err(OutboxError::redb)?
                    .take(batch.max(1) * 2)
                {
                    let (id, at) = entry.map_err(OutboxError::redb)?;
                    if at.value() < cutoff {
                        old.push(id.value());
                        if old.len() >= batch.max(1) {
                            break;
                        }
                    }
                }
                for &id in &old {
                    sent.remove(id).map_err(OutboxError::redb)?;
                    rows.remove(id).map_err(OutboxError::redb)?;
                }
                deleted = old.len();
            }
            tx.commit().map_err(OutboxError::redb)?;
            total += deleted as u64;
            if deleted < batch.max(1) {
                return Ok(total);
            }
        }
    }

    /// Claims due rows in id order, skipping every row of a key whose older row is claimed
    /// by another worker or waits for a retry.
    fn claim_now(
        &self,
        limit: usize,
    ) -> Result<(ClaimGuard, Vec<OutboxRow>, Vec<u64>), OutboxError> {
        let now = now_ms();
        // Lock before reading: a worker commits its marks before it releases its claims, so
        // a read that starts under the lock never sees a released row as still pending.
        let mut claimed = lock(&self.shared.claimed);
        let tx = self.db.begin_read().map_err(OutboxError::redb)?;
        let rows = tx.open_table(ROWS).map_err(OutboxError::redb)?;
        let pending = tx.open_table(PENDING).map_err(OutboxError::redb)?;
        let mut blocked: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        let mut held = Vec::new();
        // Bounded scan, so a long run of waiting rows cannot make every claim read the table.
        for entry in pending.iter().map_err(OutboxError::redb)?.take(limit * 4) {
            if out.len() >= limit {
                break;
            }
            let (id, due) = entry.map_err(OutboxError::redb)?;
            let (id, due) = (id.value(), due.value());
            let Some(bytes) = rows.get(id).map_err(OutboxError::redb)? else {
                continue;
            };
            let row = decode(id, bytes.value())?;
            let taken_elsewhere = claimed.contains(&id);
            let key_blocked = row.key.as_ref().is_some_and(|k| blocked.contains(k));
            if taken_elsewhere || due > now || key_blocked {
                if let Some(k) = row.key {
                    blocked.insert(k);
                }
                if taken_elsewhere || key_blocked {
                    held.push(id);
                }
                continue;
            }
            claimed.insert(id);
            out.push(OutboxRow {
                id,
                message_id: format!("{}-{id}", self.prefix),
                topic: row.topic,
                key: row.key,
                headers: row.headers.into_iter().collect::<BTreeMap<_, _>>(),
                body: row.body,
                attempts: row.attempts,
                created_at_ms: row.created_at_ms,
            });
        }
        let guard = ClaimGuard {
            shared: self.shared.clone(),
            ids: out.iter().map(|r| r.id).collect(),
        };
        Ok((guard, out, held))
    }

    fn finish_now(&self, sent_ids: &[u64], failed: &[RowFailure]) -> Result<(), OutboxError> {
        let now = now_ms();
        let tx = self.db.begin_write().map_err(OutboxError::redb)?;
        {
            let mut pending = tx.open_table(PENDING).map_err(OutboxError::redb)?;
            let mut sent = tx.open_table(SENT).map_err(OutboxError::redb)?;
            let mut parked = tx.open_table(PARKED).map_err(OutboxError::redb)?;
            let mut rows = tx.open_table(ROWS).map_err(OutboxError::redb)?;
            for &id in sent_ids {
                pending.remove(id).map_err(OutboxError::redb)?;
                sent.insert(id, now).map_err(OutboxError::redb)?;
            }
            for f in failed {
                let stored = match rows.get(f.id).map_err(OutboxError::redb)? {
                    Some(bytes) => decode(f.id, bytes.value())?,
                    None => continue,
                };
                let mut row = stored;
                row.attempts = f.attempts;
                row.last_error = Some(f.error.clone());
                rows.insert(f.id, encode(f.id, &row)?.as_slice())
                    .map_err(OutboxError::redb)?;
                match f.retry_in {
                    Some(delay) => {
                        let due = now
                            .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                        pending.insert(f.id, due).map_err(OutboxError::redb)?;
                    }
                    None => {
                        pending.remove(f.id).map_err(OutboxError::redb)?;
                        parked.insert(f.id, now).map_err(OutboxError::redb)?;
                    }
                }
            }
        }
        tx.commit().map_err(OutboxError::redb)?;
        Ok(())
    }
}

/// Rows in the shared claimed set, released when dropped: also when the worker that
/// claimed them is dropped mid-await (the blocking task's result is dropped on completion).
#[derive(Debug)]
struct ClaimGuard {
    shared: Arc<Shared>,
    ids: Vec<u64>,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let mut claimed = lock(&self.shared.claimed);
        for id in &self.ids {
            claimed.remove(id);
        }
    }
}

/// A redb relay worker: the rows it holds in the shared claimed set.
#[derive(Debug)]
pub struct RedbWorker {
    outbox: RedbOutbox,
    claim: Option<ClaimGuard>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, OutboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OutboxError::Invalid(format!("redb task failed: {e}")))?
}

impl RelayStore for RedbOutbox {
    type Worker = RedbWorker;

    async fn open_worker(&self) -> Result<RedbWorker, OutboxError> {
        Ok(RedbWorker {
            outbox: self.clone(),
            claim: None,
        })
    }

    async fn listen(&self, wake: watch::Sender<u64>) {
        let mut rx = self.shared.wake.subscribe();
        while rx.changed().await.is_ok() {
            wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    async fn clean(&self, retention: Duration, batch: usize) -> Result<u64, OutboxError> {
        let me = self.clone();
        blocking(move || me.clean_now(retention, batch)).await
    }

    async fn status(&self) -> Result<OutboxStatus, OutboxError> {
        let me = self.clone();
        blocking(move || me.status_now()).await
    }
}

impl ClaimWorker for RedbWorker {
    async fn claim(&mut self, limit: usize) -> Result<Claimed, OutboxError> {
        let me = self.outbox.clone();
        let (guard, rows, held) = blocking(move || me.claim_now(limit)).await?;
        self.claim = Some(guard);
        Ok(Claimed { rows, held })
    }

    async fn finish(&mut self, sent: &[u64], failed: &[RowFailure]) -> Result<(), OutboxError> {
        let me = self.outbox.clone();
        let (sent, failed) = (sent.to_vec(), failed.to_vec());
        // The claim is released only after the marks commit, even if this future is dropped.
        let guard = self.claim.take();
        blocking(move || {
            let result = me.finish_now(&sent, &failed);
            drop(guard);
            result
        })
        .await
    }

    async fn release(&mut self) -> Result<(), OutboxError> {
        self.claim = None;
        Ok(())
    }
}

/// The consumer side's table of applied message ids, in the consumer's redb file.
#[derive(Clone, Debug)]
pub struct RedbInbox {
    db: Arc<Database>,
}

impl RedbInbox {
    /// An inbox in `db` (table `escrow_inbox`).
    pub fn new(db: Arc<Database>) -> Result<RedbInbox, OutboxError> {
        let tx = db.begin_write().map_err(OutboxError::redb)?;
        tx.open_table(INBOX).map_err(OutboxError::redb)?;
        tx.commit().map_err(OutboxError::redb)?;
        Ok(RedbInbox { db })
    }

    /// Runs `effect` and records `message_id` in one write transaction, unless the id is
    /// recorded already. An effect error aborts the transaction. Blocking: call it from
    /// `spawn_blocking` in async code.
    pub fn process<T, E>(
        &self,
        message_id: &str,
        effect: impl FnOnce(&WriteTransaction) -> Result<T, E>,
    ) -> Result<Processed<T>, InboxError<E>> {
        let tx = self.db.begin_write().map_err(OutboxError::redb)?;
        {
            let mut inbox = tx.open_table(INBOX).map_err(OutboxError::redb)?;
            if inbox.get(message_id).map_err(OutboxError::redb)?.is_some() {
                drop(inbox);
                tx.abort().map_err(OutboxError::redb)?;
                return Ok(Processed::Duplicate);
            }
            inbox
                .insert(message_id, now_ms())
                .map_err(OutboxError::redb)?;
        }
        match effect(&tx) {
            Ok(value) => {
                tx.commit().map_err(OutboxError::redb)?;
                Ok(Processed::Applied(value))
            }
            Err(e) => {
                let _ = tx.abort();
                Err(InboxError::Effect(e))
            }
        }
    }

    /// Whether `message_id` was processed.
    pub fn contains(&self, message_id: &str) -> Result<bool, OutboxError> {
        let tx = self.db.begin_read().map_err(OutboxError::redb)?;
        let inbox = tx.open_table(INBOX).map_err(OutboxError::redb)?;
        Ok(inbox.get(message_id).map_err(OutboxError::redb)?.is_some())
    }
}
