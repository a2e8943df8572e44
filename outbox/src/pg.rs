//! The PostgreSQL store: outbox table, claims with `FOR UPDATE SKIP LOCKED`, LISTEN/NOTIFY
//! wake-ups, the cleaner, status, and the inbox.
//!
//! Table contract (created by [`PgOutbox::migrate`], names configurable):
//!
//! ```sql
//! CREATE TABLE escrow_outbox (
//!     id              bigserial PRIMARY KEY,   -- write order; message id = '<prefix>-<id>'
//!     topic           text NOT NULL,
//!     key             text,                    -- aggregate: per-key order
//!     headers         jsonb NOT NULL DEFAULT '{}',
//!     body            bytea NOT NULL,
//!     state           text NOT NULL DEFAULT 'pending',  -- pending | sent | parked
//!     attempts        integer NOT NULL DEFAULT 0,
//!     last_error      text,
//!     created_at      timestamptz NOT NULL DEFAULT now(),
//!     next_attempt_at timestamptz,             -- NULL: now
//!     sent_at         timestamptz
//! );
//! ```
//!
//! A claim is one transaction held while its rows are published: the row locks are the
//! claim, so a relay that dies (even by SIGKILL) loses them with its connection and another
//! relay takes the rows over. No row is ever skipped because of a scan position: pending
//! rows are found by state, never by `id > last_seen`.

use crate::core::{self, KeyHead};
use crate::relay::{ClaimWorker, Claimed, RelayStore};
use crate::{
    InboxError, NewMessage, OutboxError, OutboxRow, OutboxStatus, ParkedRow, Processed, RowFailure,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::{Client, GenericClient, NoTls, Statement, Transaction};

/// Table and channel names of a PostgreSQL outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgConfig {
    /// The outbox table (`name` or `schema.name`). Default `escrow_outbox`.
    pub table: String,
    /// The LISTEN/NOTIFY channel that wakes relays. Default: the table name with `.` as `_`.
    pub channel: String,
    /// Prefix of message ids (`<prefix>-<row id>`). Default: the table name. Give a
    /// recreated table a new prefix, or its ids would be deduplicated against the old ones.
    pub message_id_prefix: String,
    /// Whether [`PgOutbox::enqueue`] sends a NOTIFY (delivered at commit). Default true.
    pub notify: bool,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig::for_table("escrow_outbox")
    }
}

impl PgConfig {
    /// Defaults derived from a table name.
    pub fn for_table(table: &str) -> PgConfig {
        PgConfig {
            table: table.to_string(),
            channel: table.replace('.', "_"),
            message_id_prefix: table.to_string(),
            notify: true,
        }
    }

    /// Checks the names (they are put into SQL text, so only plain identifiers pass).
    pub fn validate(&self) -> Result<(), OutboxError> {
        let parts: Vec<&str> = self.table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| is_identifier(p)) {
            return Err(OutboxError::Invalid(format!(
                "table {:?} must be `name` or `schema.name` of ASCII letters, digits and _",
                self.table
            )));
        }
        if !is_identifier(&self.channel) {
            return Err(OutboxError::Invalid(format!(
                "channel {:?} must be ASCII letters, digits and _",
                self.channel
            )));
        }
        if self.message_id_prefix.is_empty() || self.message_id_prefix.len() > 100 {
            return Err(OutboxError::Invalid(
                "message id prefix must be 1..=100 bytes".into(),
            ));
        }
        Ok(())
    }

    /// The table name without its schema (index names are derived from it).
    fn base(&self) -> &str {
        self.table.rsplit('.').next().unwrap_or(&self.table)
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An outbox table in PostgreSQL: enqueue inside the caller's transaction; the relay's
/// store ([`RelayStore`]) with its own connections to `url`.
#[derive(Clone, Debug)]
pub struct PgOutbox {
    url: String,
    config: PgConfig,
    sql: Sql,
}

/// SQL text, built once from the table name.
#[derive(Clone, Debug)]
struct Sql {
    enqueue_notify: String,
    enqueue: String,
    claim: String,
    heads: String,
    mark_sent: String,
    mark_failed: String,
    status: String,
    parked: String,
    clean: String,
    retry_parked: String,
}

impl Sql {
    fn new(config: &PgConfig) -> Sql {
        let t = &config.table;
        let insert = format!(
            "INSERT INTO {t} (topic, key, headers, body) VALUES ($1, $2, $3::text::jsonb, $4) RETURNING id"
        );
        Sql {
            enqueue_notify: format!(
                "WITH row AS ({insert}) SELECT id, pg_notify($5, '')::text FROM row"
            ),
            enqueue: insert,
            claim: format!(
                "SELECT id, topic, key, headers::text, body, attempts, \
                 (extract(epoch FROM created_at) * 1000)::int8 \
                 FROM {t} o WHERE state = 'pending' \
                 AND (next_attempt_at IS NULL OR next_attempt_at <= now()) \
                 AND NOT EXISTS (SELECT 1 FROM {t} r WHERE r.key = o.key AND r.id < o.id \
                   AND r.state = 'pending' AND r.next_attempt_at IS NOT NULL \
                   AND r.next_attempt_at > now()) \
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
            ),
            heads: format!(
                "SELECT c.key, min(o.id), count(o.id) \
                 FROM unnest($1::text[], $2::int8[]) AS c(key, max_id) \
                 JOIN {t} o ON o.key = c.key AND o.id <= c.max_id \
                 WHERE o.state = 'pending' GROUP BY c.key"
            ),
            mark_sent: format!(
                "UPDATE {t} SET state = 'sent', sent_at = now() WHERE id = ANY($1::int8[])"
            ),
            mark_failed: format!(
                "UPDATE {t} AS o SET attempts = f.attempts, last_error = f.error, \
                 state = CASE WHEN f.park THEN 'parked' ELSE 'pending' END, \
                 next_attempt_at = CASE WHEN f.park THEN NULL \
                   ELSE clock_timestamp() + f.delay_ms * interval '1 millisecond' END \
                 FROM unnest($1::int8[], $2::int4[], $3::text[], $4::bool[], $5::int8[]) \
                   AS f(id, attempts, error, park, delay_ms) \
                 WHERE o.id = f.id"
            ),
            status: format!(
                "SELECT count(*) FILTER (WHERE state = 'pending'), \
                 count(*) FILTER (WHERE state = 'parked'), \
                 count(*) FILTER (WHERE state = 'sent'), \
                 count(*) FILTER (WHERE state = 'sent' AND sent_at > now() - interval '1 minute'), \
                 coalesce((extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending')) * 1000)::int8, 0) \
                 FROM {t}"
            ),
            parked: format!(
                "SELECT id, topic, key, attempts, coalesce(last_error, '') FROM {t} \
                 WHERE state = 'parked' ORDER BY id LIMIT 10"
            ),
            clean: format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE state = 'sent' \
                 AND sent_at < now() - $1::int8 * interval '1 millisecond' ORDER BY sent_at LIMIT $2)"
            ),
            retry_parked: format!(
                "UPDATE {t} SET state = 'pending', attempts = 0, next_attempt_at = NULL \
                 WHERE state = 'parked' AND ($1::int8[] IS NULL OR id = ANY($1::int8[]))"
            ),
        }
    }
}

/// Runs `connection` in the background; it ends when the client is dropped or the server goes.
async fn connect(url: &str) -> Result<Client, OutboxError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

fn to_id(id: i64) -> u64 {
    // bigserial ids are positive; a negative one would be a hand-written row.
    u64::try_from(id).unwrap_or(0)
}

fn to_i64(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

impl PgOutbox {
    /// An outbox in the database at `url` (a libpq-style connection string or URL); the
    /// relay opens its own connections there. Nothing is connected yet.
    pub fn new(url: impl Into<String>, config: PgConfig) -> Result<PgOutbox, OutboxError> {
        config.validate()?;
        let sql = Sql::new(&config);
        Ok(PgOutbox {
            url: url.into(),
            config,
            sql,
        })
    }

    /// The names in use.
    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// Creates the table and its indexes if missing (safe to run from several processes at once).
    pub async fn migrate(&self, client: &impl GenericClient) -> Result<(), OutboxError> {
        let t = &self.config.table;
        let b = self.config.base();
        let ddl = format!(
            "SELECT pg_advisory_xact_lock(hashtext('escrow-outbox-migrate'));
             CREATE TABLE IF NOT EXISTS {t} (
                 id bigserial PRIMARY KEY,
                 topic text NOT NULL,
                 key text,
                 headers jsonb NOT NULL DEFAULT '{{}}',
                 body bytea NOT NULL,
                 state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'parked')),
                 attempts integer NOT NULL DEFAULT 0,
                 last_error text,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 next_attempt_at timestamptz,
                 sent_at timestamptz
             );
             CREATE INDEX IF NOT EXISTS {b}_pending ON {t} (id) WHERE state = 'pending';
             CREATE INDEX IF NOT EXISTS {b}_pending_key ON {t} (key, id) WHERE state = 'pending';
             CREATE INDEX IF NOT EXISTS {b}_sent ON {t} (sent_at) WHERE state = 'sent';
             CREATE INDEX IF NOT EXISTS {b}_parked ON {t} (id) WHERE state = 'parked';
             CREATE INDEX IF NOT EXISTS {b}_retrying ON {t} (key, id)
                 WHERE state = 'pending' AND next_attempt_at IS NOT NULL;"
        );
        in_transaction(client, &ddl).await
    }

    /// Writes `message` as a pending row through `client`: pass the caller's transaction so
    /// the row commits (or rolls back) with the business data. Returns the row id.
    pub async fn enqueue(
        &self,
        client: &impl GenericClient,
        message: &NewMessage,
    ) -> Result<u64, OutboxError> {
        let headers = serde_json::to_string(&message.headers)
            .map_err(|e| OutboxError::Invalid(format!("headers: {e}")))?;
        let row = if self.config.notify {
            client
                .query_one(
                    &self.sql.enqueue_notify,
                    &[
                        &message.topic,
                        &message.key,
                        &headers,
                        &message.body,
                        &self.config.channel,
                    ],
                )
                .await?
        } else {
            client
                .query_one(
                    &self.sql.enqueue,
                    &[&message.topic, &message.key, &headers, &message.body],
                )
                .await?
        };
        Ok(to_id(row.try_get(0)?))
    }

    /// Backlog, lag, publish rate and parked rows.
    pub async fn status(&self, client: &impl GenericClient) -> Result<OutboxStatus, OutboxError> {
        let row = client.query_one(&self.sql.status, &[]).await?;
        let count = |i: usize| -> Result<u64, OutboxError> {
            Ok(u64::try_from(row.try_get::<_, i64>(i)?).unwrap_or(0))
        };
        let parked_rows = client
            .query(&self.sql.parked, &[])
            .await?
            .iter()
            .map(|r| {
                Ok(ParkedRow {
                    id: to_id(r.try_get(0)?),
                    topic: r.try_get(1)?,
                    key: r.try_get(2)?,
                    attempts: u32::try_from(r.try_get::<_, i32>(3)?).unwrap_or(0),
                    last_error: r.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, OutboxError>>()?;
        Ok(OutboxStatus {
            pending: count(0)?,
            parked: count(1)?,
            sent_retained: count(2)?,
            sent_last_minute: count(3)?,
            lag_ms: count(4)?,
            parked_rows,
        })
    }

    /// Makes parked rows pending again (all of them when `ids` is `None`); returns how many.
    pub async fn retry_parked(
        &self,
        client: &impl GenericClient,
        ids: Option<&[u64]>,
    ) -> Result<u64, OutboxError> {
        let ids: Option<Vec<i64>> = ids.map(|ids| ids.iter().map(|&i| to_i64(i)).collect());
        Ok(client.execute(&self.sql.retry_parked, &[&ids]).await?)
    }

    /// Deletes sent rows older than `retention`, `batch` rows per transaction, if no other
    /// cleaner holds the table's cleaner lock. Returns how many rows were deleted.
    pub async fn clean(
        &self,
        client: &mut Client,
        retention: Duration,
        batch: usize,
    ) -> Result<u64, OutboxError> {
        let lock = format!("escrow-outbox-cleaner:{}", self.config.table);
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let batch = i64::try_from(batch.max(1)).unwrap_or(1000);
        let mut total = 0;
        loop {
            let tx = client.transaction().await?;
            let locked: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock(hashtext($1))", &[&lock])
                .await?
                .try_get(0)?;
            if !locked {
                return Ok(total);
            }
            let deleted = tx
                .execute(&self.sql.clean, &[&retention_ms, &batch])
                .await?;
            tx.commit().await?;
            total += deleted;
            if deleted < batch as u64 {
                return Ok(total);
            }
        }
    }
}

async fn in_transaction(client: &impl GenericClient, sql: &str) -> Result<(), OutboxError> {
    // A simple-query string with several statements runs as one implicit transaction;
    // inside a caller's transaction it simply joins it.
    client.batch_execute(sql).await?;
    Ok(())
}

/// One relay worker's connection with its statements prepared once.
#[derive(Debug)]
pub struct PgWorker {
    client: Client,
    claim: Statement,
    heads: Statement,
    mark_sent: Statement,
    mark_failed: Statement,
    prefix: String,
    in_transaction: bool,
}

impl RelayStore for PgOutbox {
    type Worker = PgWorker;

    async fn open_worker(&self) -> Result<PgWorker, OutboxError> {
        let client = connect(&self.url).await?;
        Ok(PgWorker {
            claim: client.prepare(&self.sql.claim).await?,
            heads: client.prepare(&self.sql.heads).await?,
            mark_sent: client.prepare(&self.sql.mark_sent).await?,
            mark_failed: client.prepare(&self.sql.mark_failed).await?,
            client,
            prefix: self.config.message_id_prefix.clone(),
            in_transaction: false,
        })
    }

    async fn listen(&self, wake: watch::Sender<u64>) {
        loop {
            if let Err(e) = self.listen_once(&wake).await {
                tracing::warn!(error = %e, "LISTEN connection lost; polling until it is back");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn clean(&self, retention: Duration, batch: usize) -> Result<u64, OutboxError> {
        let mut client = connect(&self.url).await?;
        PgOutbox::clean(self, &mut client, retention, batch).await
    }

    async fn status(&self) -> Result<OutboxStatus, OutboxError> {
        let client = connect(&self.url).await?;
        PgOutbox::status(self, &client).await
    }
}

impl PgOutbox {
    async fn listen_once(&self, wake: &watch::Sender<u64>) -> Result<(), OutboxError> {
        let (client, mut connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let wake_on_notify = wake.clone();
        // The connection yields notifications only to whoever polls it.
        let driver = tokio::spawn(async move {
            let result = loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                        wake_on_notify.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                }
            };
            let _ = done_tx.send(result);
        });
        client
            .batch_execute(&format!("LISTEN \"{}\"", self.config.channel))
            .await?;
        // Rows may have been written while we were not listening.
        wake.send_modify(|n| *n = n.wrapping_add(1));
        let result = done_rx.await;
        driver.abort();
        drop(client);
        match result {
            Ok(r) => Ok(r?),
            Err(_) => Ok(()),
        }
    }
}

impl ClaimWorker for PgWorker {
    async fn claim(&mut self, limit: usize) -> Result<Claimed, OutboxError> {
        self.client.batch_execute("BEGIN").await?;
        self.in_transaction = true;
        let limit = i64::try_from(limit.max(1)).unwrap_or(1000);
        let mut rows = Vec::new();
        for r in self.client.query(&self.claim, &[&limit]).await? {
            let id = to_id(r.try_get(0)?);
            let headers: String = r.try_get(3)?;
            let headers: BTreeMap<String, String> =
                serde_json::from_str(&headers).map_err(|e| OutboxError::Corrupt {
                    id,
                    reason: format!("headers are not a JSON object of strings: {e}"),
                })?;
            rows.push(OutboxRow {
                id,
                message_id: format!("{}-{id}", self.prefix),
                topic: r.try_get(1)?,
                key: r.try_get(2)?,
                headers,
                body: r.try_get(4)?,
                attempts: u32::try_from(r.try_get::<_, i32>(5)?).unwrap_or(0),
                created_at_ms: u64::try_from(r.try_get::<_, i64>(6)?).unwrap_or(0),
            });
        }
        // Highest claimed id per key, to ask which older rows of those keys are pending.
        let mut max_per_key: HashMap<&str, u64> = HashMap::new();
        for row in &rows {
            if let Some(k) = row.key.as_deref() {
                max_per_key.insert(k, row.id);
            }
        }
        let mut heads = HashMap::new();
        if !max_per_key.is_empty() {
            let keys: Vec<&str> = max_per_key.keys().copied().collect();
            let maxes: Vec<i64> = keys.iter().map(|k| to_i64(max_per_key[k])).collect();
            for r in self.client.query(&self.heads, &[&keys, &maxes]).await? {
                let key: String = r.try_get(0)?;
                heads.insert(
                    key,
                    KeyHead {
                        first_pending: to_id(r.try_get(1)?),
                        pending_up_to_claimed: u64::try_from(r.try_get::<_, i64>(2)?).unwrap_or(0),
                    },
                );
            }
        }
        let (rows, held) = core::publishable(rows, &heads);
        Ok(Claimed { rows, held })
    }

    async fn finish(&mut self, sent: &[u64], failed: &[RowFailure]) -> Result<(), OutboxError> {
        if !sent.is_empty() {
            let ids: Vec<i64> = sent.iter().map(|&i| to_i64(i)).collect();
            self.client.execute(&self.mark_sent, &[&ids]).await?;
        }
        if !failed.is_empty() {
            let ids: Vec<i64> = failed.iter().map(|f| to_i64(f.id)).collect();
            let attempts: Vec<i32> = failed
                .iter()
                .map(|f| i32::try_from(f.attempts).unwrap_or(i32::MAX))
                .collect();
            let errors: Vec<&str> = failed.iter().map(|f| f.error.as_str()).collect();
            let park: Vec<bool> = failed.iter().map(|f| f.retry_in.is_none()).collect();
            let delays: Vec<i64> = failed
                .iter()
                .map(|f| {
                    f.retry_in
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                })
                .collect();
            self.client
                .execute(
                    &self.mark_failed,
                    &[&ids, &attempts, &errors, &park, &delays],
                )
                .await?;
        }
        self.client.batch_execute("COMMIT").await?;
        self.in_transaction = false;
        Ok(())
    }

    async fn release(&mut self) -> Result<(), OutboxError> {
        if self.in_transaction {
            self.in_transaction = false;
            self.client.batch_execute("ROLLBACK").await?;
        }
        Ok(())
    }
}

/// The consumer side's table of applied message ids (BASE's `updates_applied`).
#[derive(Clone, Debug)]
pub struct PgInbox {
    table: String,
    insert: String,
}

impl PgInbox {
    /// An inbox table (`name` or `schema.name`).
    pub fn new(table: &str) -> Result<PgInbox, OutboxError> {
        PgConfig::for_table(table).validate()?;
        Ok(PgInbox {
            table: table.to_string(),
            insert: format!(
                "INSERT INTO {table} (message_id) VALUES ($1) ON CONFLICT (message_id) DO NOTHING"
            ),
        })
    }

    /// Creates the inbox table if missing.
    pub async fn migrate(&self, client: &impl GenericClient) -> Result<(), OutboxError> {
        let t = &self.table;
        in_transaction(
            client,
            &format!(
                "SELECT pg_advisory_xact_lock(hashtext('escrow-outbox-migrate'));
                 CREATE TABLE IF NOT EXISTS {t} (
                     message_id text PRIMARY KEY,
                     processed_at timestamptz NOT NULL DEFAULT now()
                 );"
            ),
        )
        .await
    }

    /// Starts a transaction with `message_id` recorded in it; `None` if it was recorded
    /// already (a duplicate delivery). Run the effect in the transaction, then commit it.
    /// A concurrent delivery of the same id waits here until this one commits or rolls back.
    pub async fn begin<'c, C: GenericClient + Send>(
        &self,
        client: &'c mut C,
        message_id: &str,
    ) -> Result<Option<Transaction<'c>>, OutboxError> {
        let tx = client.transaction().await?;
        if tx.execute(&self.insert, &[&message_id]).await? == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(tx))
    }

    /// Runs `effect` and records `message_id` in one transaction, unless the id is recorded
    /// already. An effect error rolls everything back (the delivery can be retried).
    pub async fn process<C, T, E, F>(
        &self,
        client: &mut C,
        message_id: &str,
        effect: F,
    ) -> Result<Processed<T>, InboxError<E>>
    where
        C: GenericClient + Send,
        F: AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
    {
        let Some(tx) = self.begin(client, message_id).await? else {
            return Ok(Processed::Duplicate);
        };
        match effect(&tx).await {
            Ok(value) => {
                tx.commit().await.map_err(OutboxError::from)?;
                Ok(Processed::Applied(value))
            }
            Err(e) => {
                // Dropping the transaction rolls it back too; say so explicitly.
                let _ = tx.rollback().await;
                Err(InboxError::Effect(e))
            }
        }
    }

    /// Forgets ids processed longer ago than `age` (keep it longer than any redelivery).
    pub async fn purge_older_than(
        &self,
        client: &impl GenericClient,
        age: Duration,
    ) -> Result<u64, OutboxError> {
        let ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        Ok(client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE processed_at < now() - $1::int8 * interval '1 millisecond'",
                    self.table
                ),
                &[&ms],
            )
            .await?)
    }
}
