//! The deterministic state machine: commands in, durable state and outputs out.
//!
//! [`StateMachine::apply`] is the only writer of replicated state. Given the same
//! batches in the same order it produces the same stored bytes and outputs on every
//! node; it reads no clock (the batch carries its time) and no leader-local state.

pub mod command;
pub mod producers;
pub mod progress;

use crate::metrics::Metrics;
use crate::storage::{
    BodyAt, HalfRecord, Loaded, RecordRef, StorageError, Store, StoredId, TopicRecord, Writer,
};
use command::{Batch, Command, HalfMessage, Output};
use escrow_proto::txn::TxnState;
use escrow_proto::{
    ErrorCode, ErrorResponse, Position, ProducerSequence, QueueInfo, TopicInfo, MAX_QUEUES,
};
use producers::{ProducerState, Seen};
use progress::QueueProgress;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// Decided transactions remembered for late or conflicting `EndTxn` (by id, the latest).
const REMEMBERED_OUTCOMES: u64 = 1_000_000;

fn describe(state: TxnState) -> &'static str {
    match state {
        TxnState::Pending => "pending",
        TxnState::Committed(_) => "committed",
        TxnState::RolledBack => "rolled back",
        TxnState::Abandoned => "abandoned after its checks",
    }
}

/// A pending transaction as the read view holds it (the message stays on disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingTxn {
    /// Topic it goes to when committed.
    pub topic: String,
    /// Producer group asked on check-back.
    pub producer_group: String,
    /// The sending producer instance.
    pub instance: String,
    /// The message id.
    pub message_id: String,
    /// When it was stored.
    pub stored_at_ms: u64,
    /// Check-backs made.
    pub checks: u32,
    /// When the next check-back is due.
    pub next_check_at_ms: u64,
}

impl PendingTxn {
    fn new(record: &HalfRecord, (checks, next_check_at_ms): (u32, u64)) -> PendingTxn {
        PendingTxn {
            topic: record.topic.clone(),
            producer_group: record.producer_group.clone(),
            instance: record.instance.clone(),
            message_id: record.message.id.clone(),
            stored_at_ms: record.stored_at_ms,
            checks,
            next_check_at_ms,
        }
    }
}

/// The reserved group whose acks on a dead-letter topic mark entries redriven.
pub const REDRIVE_GROUP: &str = "%redriven%";

/// Bounds one expiry command's work, so applying it stays short.
const MAX_IDS_EXPIRED_PER_COMMAND: usize = 50_000;

/// A topic's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicState {
    /// Numeric id used in storage keys.
    pub id: u32,
    /// Creation time.
    pub created_at_ms: u64,
    /// Per-queue offsets.
    pub queues: Vec<QueueInfo>,
}

impl TopicState {
    /// The wire description.
    pub fn info(&self, name: &str) -> TopicInfo {
        TopicInfo {
            name: name.to_string(),
            queues: self.queues.clone(),
            created_at_ms: self.created_at_ms,
        }
    }
}

/// `(group, topic)`.
pub type GroupTopic = (String, String);

/// The in-memory view of replicated state, readable by request handlers.
#[derive(Clone, Debug, Default)]
pub struct Index {
    /// Last applied log index.
    pub commit_index: u64,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicState>,
    /// Group progress per `(group, topic)`, one entry per queue.
    pub progress: HashMap<GroupTopic, Vec<QueueProgress>>,
    /// Idempotent producers by id.
    pub producers: HashMap<u64, ProducerState>,
    /// Pending transactions by id.
    pub txns: BTreeMap<u64, PendingTxn>,
    /// Id the next half message gets.
    pub next_txn_id: u64,
}

impl Index {
    fn from_loaded(loaded: Loaded) -> Index {
        let mut index = Index {
            commit_index: loaded.commit_index,
            producers: loaded.producers.into_iter().collect(),
            txns: loaded
                .txns
                .iter()
                .map(|(id, record, schedule)| (*id, PendingTxn::new(record, *schedule)))
                .collect(),
            next_txn_id: loaded.next_txn_id,
            ..Index::default()
        };
        let mut names = HashMap::new();
        for (name, record, ends) in loaded.topics {
            names.insert(record.id, (name.clone(), record.queues));
            index.topics.insert(
                name,
                TopicState {
                    id: record.id,
                    created_at_ms: record.created_at_ms,
                    queues: ends
                        .into_iter()
                        .map(|next_offset| QueueInfo {
                            low_offset: 0,
                            next_offset,
                        })
                        .collect(),
                },
            );
        }
        for (group, topic_id, queue, progress) in loaded.progress {
            if let Some((name, queues)) = names.get(&topic_id) {
                let entry = index
                    .progress
                    .entry((group, name.clone()))
                    .or_insert_with(|| vec![QueueProgress::default(); *queues as usize]);
                if let Some(slot) = entry.get_mut(queue as usize) {
                    *slot = progress;
                }
            }
        }
        index
    }
}

/// What a transaction changed, so the shared view can be refreshed after the commit.
#[derive(Debug, Default)]
struct Touched {
    topics: HashSet<String>,
    progress: HashSet<GroupTopic>,
    producers: HashSet<u64>,
    txns: HashSet<u64>,
    messages: u64,
    bytes: u64,
    commands: u64,
}

/// Where applied state is published for request handlers.
#[derive(Debug, Clone)]
pub struct Published {
    /// Read view.
    pub view: Arc<RwLock<Index>>,
    /// Bumped after every applied transaction, to wake long-polling receivers.
    pub commits: watch::Sender<u64>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl Published {
    /// A fresh view holding `index`.
    pub fn new(index: Index, metrics: Arc<Metrics>) -> Published {
        Published {
            view: Arc::new(RwLock::new(index)),
            commits: watch::channel(0).0,
            metrics,
        }
    }
}

/// Owner of the replicated state: the store and the authoritative index.
#[derive(Debug)]
pub struct StateMachine {
    store: Arc<Store>,
    index: Index,
    published: Option<Published>,
    /// Pending transactions by `(producer group, message id)`: a retried `SendHalf`
    /// (its answer lost) gets the first one's id instead of a second transaction.
    half_ids: HashMap<(String, String), u64>,
}

fn half_ids(index: &Index) -> HashMap<(String, String), u64> {
    index
        .txns
        .iter()
        .map(|(id, t)| ((t.producer_group.clone(), t.message_id.clone()), *id))
        .collect()
}

impl StateMachine {
    /// Loads the state machine from its store.
    pub fn open(store: Arc<Store>) -> Result<StateMachine, StorageError> {
        let index = Index::from_loaded(store.load()?);
        Ok(StateMachine {
            store,
            half_ids: half_ids(&index),
            index,
            published: None,
        })
    }

    /// Publishes every later change to `published` (starting with the current state).
    pub fn publish_to(&mut self, published: Published) {
        *published.view.write().unwrap_or_else(|e| e.into_inner()) = self.index.clone();
        self.published = Some(published);
    }

    /// The authoritative index (as of the last applied transaction).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Starts applying log entries; everything goes into one write transaction.
    /// Messages are borrowed from the batches (`'b`) until the commit writes them.
    pub fn begin<'b>(&mut self) -> Result<Applying<'_, 'b>, StorageError> {
        Ok(Applying {
            writer: self.store.begin()?,
            bodies_in_log: self.store.log().is_some(),
            machine: self,
            touched: Touched::default(),
            segments: BTreeMap::new(),
            log_index: 0,
            next_ordinal: 0,
        })
    }

    /// Replaces the whole state with a snapshot image and reloads the index.
    pub fn install(&mut self, image: &[u8]) -> Result<(), StorageError> {
        self.store.import(image)?;
        self.index = Index::from_loaded(self.store.load()?);
        self.half_ids = half_ids(&self.index);
        if let Some(p) = &self.published {
            *p.view.write().unwrap_or_else(|e| e.into_inner()) = self.index.clone();
            p.commits.send_replace(self.index.commit_index);
        }
        Ok(())
    }

    /// Applies a batch in its own durable transaction at log index `index` (tests, tools).
    pub fn apply(&mut self, index: u64, batch: &Batch) -> Result<Vec<Output>, StorageError> {
        let mut applying = self.begin()?;
        let outputs = applying.apply(index, batch)?;
        applying.commit(index, true)?;
        Ok(outputs)
    }
}

/// One write transaction applying log entries in order.
#[derive(Debug)]
pub struct Applying<'a, 'b> {
    machine: &'a mut StateMachine,
    writer: Writer,
    touched: Touched,
    /// Per `(topic id, queue)`: base offset, commit time of the first batch, records.
    segments: BTreeMap<(u32, u32), (u64, u64, Vec<RecordRef<'b>>)>,
    /// Whether published bodies stay in the Raft log (the store has one attached).
    bodies_in_log: bool,
    /// Log index of the batch being applied.
    log_index: u64,
    /// Ordinal of the next appended record in that batch (see `Batch::bodies`).
    next_ordinal: u32,
}

impl<'b> Applying<'_, 'b> {
    /// Applies the batch of the log entry at `log_index`; later batches in this
    /// transaction see its effects.
    pub fn apply(&mut self, log_index: u64, batch: &'b Batch) -> Result<Vec<Output>, StorageError> {
        self.log_index = log_index;
        self.next_ordinal = 0;
        let mut outputs = Vec::with_capacity(batch.commands.len());
        for command in &batch.commands {
            let output = self.apply_command(batch.at_ms, command)?;
            outputs.push(output);
        }
        Ok(outputs)
    }

    fn apply_command(&mut self, at_ms: u64, command: &'b Command) -> Result<Output, StorageError> {
        self.touched.commands += 1;
        Ok(match command {
            Command::CreateTopic { name, queues } => self.create_topic(at_ms, name, *queues)?,
            Command::Append {
                topic,
                producer,
                records,
                dedupe_by_id,
            } => {
                // Every record counts, stored or not: ordinals follow the entry's layout.
                let first_ordinal = self.next_ordinal;
                self.next_ordinal = first_ordinal.saturating_add(records.len() as u32);
                self.append(
                    at_ms,
                    topic,
                    *producer,
                    records,
                    *dedupe_by_id,
                    Some(first_ordinal),
                )?
            }
            Command::Ack {
                topic,
                group,
                offsets,
            } => self.ack(topic, group, offsets),
            Command::ExpireProducers { idle_before_ms } => {
                self.expire_producers(*idle_before_ms)?
            }
            Command::ExpireMessageIds {
                stored_before_ms,
                keep_at_most,
            } => Output::Expired(
                self.writer
                    .expire_message_ids(
                        *stored_before_ms,
                        *keep_at_most,
                        MAX_IDS_EXPIRED_PER_COMMAND,
                    )?
                    .try_into()
                    .unwrap_or(u32::MAX),
            ),
            Command::DeadLetter {
                topic,
                group,
                offsets,
                records,
            } => self.dead_letter(at_ms, topic, group, offsets, records)?,
            Command::Redrive {
                group,
                dead_letters,
                origins,
            } => self.redrive(group, dead_letters, origins),
            Command::SendHalf {
                half,
                first_check_at_ms,
            } => {
                let ordinal = self.next_ordinal;
                self.next_ordinal = ordinal.saturating_add(1);
                let body_at = self.bodies_in_log.then_some(BodyAt {
                    index: self.log_index,
                    ordinal,
                    len: half.message.body.len() as u32,
                });
                self.send_half(at_ms, half, *first_check_at_ms, body_at)?
            }
            Command::EndTxn { txn_id, commit } => self.end_txn(at_ms, *txn_id, *commit)?,
            Command::TxnChecked { checks } => self.txn_checked(checks)?,
            Command::AbandonTxns { txn_ids } => self.abandon_txns(at_ms, txn_ids)?,
            Command::Each(commands) => {
                let mut outputs = Vec::with_capacity(commands.len());
                for command in commands {
                    outputs.push(match command {
                        Command::Each(_) => Output::Rejected(ErrorResponse::new(
                            ErrorCode::INVALID_ARGUMENT,
                            "command groups do not nest",
                        )),
                        command => self.apply_command(at_ms, command)?,
                    });
                }
                Output::Each(outputs)
            }
        })
    }

    /// Stores a value for the Raft adapter in this transaction.
    pub fn put_raft_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.writer.put_raft_meta(key, value)
    }

    /// Writes everything, commits (fsync when `durable`) and publishes the changes.
    ///
    /// On error the in-memory index may be ahead of disk: the caller must stop applying.
    pub fn commit(self, applied_index: u64, durable: bool) -> Result<(), StorageError> {
        let Applying {
            machine,
            mut writer,
            touched,
            segments,
            ..
        } = self;
        let index = &mut machine.index;
        for ((topic_id, queue), (base, at_ms, records)) in &segments {
            writer.put_segment(*topic_id, *queue, *base, *at_ms, records)?;
        }
        for key in &touched.progress {
            let (Some(topic), Some(progress)) = (index.topics.get(&key.1), index.progress.get(key))
            else {
                continue;
            };
            for (queue, p) in progress.iter().enumerate() {
                writer.put_progress(&key.0, topic.id, queue as u32, p)?;
            }
        }
        for id in &touched.producers {
            match index.producers.get(id) {
                Some(state) => writer.put_producer(*id, state)?,
                None => writer.remove_producer(*id)?,
            }
        }
        if !touched.txns.is_empty() {
            writer.put_next_txn_id(index.next_txn_id)?;
        }
        index.commit_index = index.commit_index.max(applied_index);
        writer.commit(index.commit_index, durable)?;
        let Some(published) = &machine.published else {
            return Ok(());
        };
        {
            let mut view = published.view.write().unwrap_or_else(|e| e.into_inner());
            view.commit_index = index.commit_index;
            for name in &touched.topics {
                if let Some(t) = index.topics.get(name) {
                    view.topics.insert(name.clone(), t.clone());
                }
            }
            for key in &touched.progress {
                if let Some(p) = index.progress.get(key) {
                    view.progress.insert(key.clone(), p.clone());
                }
            }
            for id in &touched.txns {
                match index.txns.get(id) {
                    Some(t) => view.txns.insert(*id, t.clone()),
                    None => view.txns.remove(id),
                };
            }
            view.next_txn_id = index.next_txn_id;
        }
        let m = &published.metrics;
        if durable {
            m.fsyncs.fetch_add(1, Relaxed);
        }
        m.commands_applied.fetch_add(touched.commands, Relaxed);
        m.messages_appended.fetch_add(touched.messages, Relaxed);
        m.bytes_appended.fetch_add(touched.bytes, Relaxed);
        published.commits.send_replace(index.commit_index);
        Ok(())
    }

    fn create_topic(
        &mut self,
        at_ms: u64,
        name: &str,
        queues: u32,
    ) -> Result<Output, StorageError> {
        let index = &mut self.machine.index;
        if index.topics.contains_key(name) {
            return Ok(Output::Rejected(ErrorResponse::new(
                ErrorCode::TOPIC_EXISTS,
                format!("topic {name:?} exists"),
            )));
        }
        if queues == 0 || queues > MAX_QUEUES {
            return Ok(Output::Rejected(ErrorResponse::new(
                ErrorCode::INVALID_ARGUMENT,
                format!("queues must be 1..={MAX_QUEUES}"),
            )));
        }
        let id = index.topics.values().map(|t| t.id).max().unwrap_or(0) + 1;
        let record = TopicRecord {
            id,
            queues,
            created_at_ms: at_ms,
        };
        self.writer.put_topic(name, &record)?;
        let state = TopicState {
            id,
            created_at_ms: at_ms,
            queues: vec![
                QueueInfo {
                    low_offset: 0,
                    next_offset: 0
                };
                queues as usize
            ],
        };
        let info = state.info(name);
        index.topics.insert(name.to_string(), state);
        self.touched.topics.insert(name.to_string());
        Ok(Output::TopicCreated(info))
    }

    fn append(
        &mut self,
        at_ms: u64,
        topic: &str,
        producer: Option<ProducerSequence>,
        records: &'b [(u32, escrow_proto::Message)],
        dedupe_by_id: bool,
        // Where the records are among the entry's bodies, when they are there.
        first_ordinal: Option<u32>,
    ) -> Result<Output, StorageError> {
        let (log_index, bodies_in_log) = (self.log_index, self.bodies_in_log);
        let body_at = |i: usize, body: &[u8]| {
            first_ordinal.filter(|_| bodies_in_log).map(|first| BodyAt {
                index: log_index,
                ordinal: first + i as u32,
                len: body.len() as u32,
            })
        };
        let index = &mut self.machine.index;
        let Some(state) = index.topics.get_mut(topic) else {
            return Ok(Output::Rejected(unknown_topic(topic)));
        };
        if let Some((queue, _)) = records
            .iter()
            .find(|(q, _)| *q as usize >= state.queues.len())
        {
            return Ok(Output::Rejected(ErrorResponse::new(
                ErrorCode::INVALID_ARGUMENT,
                format!("queue {queue} out of range for topic {topic:?}"),
            )));
        }
        if let Some(p) = producer {
            match index
                .producers
                .get(&p.producer_id)
                .map(|s| s.lookup(p.first_sequence))
            {
                Some(Seen::Duplicate(positions)) => return Ok(Output::Appended(positions)),
                Some(Seen::Forgotten) => {
                    return Ok(Output::Rejected(ErrorResponse::new(
                        ErrorCode::SEQUENCE_DUPLICATE,
                        format!(
                            "producer {:016x} sequence {} is stored already; its positions are no longer remembered",
                            p.producer_id, p.first_sequence
                        ),
                    )))
                }
                Some(Seen::New) | None => {}
            }
        }
        let mut positions = Vec::with_capacity(records.len());
        let mut stored = 0;
        for (i, (queue, message)) in records.iter().enumerate() {
            if dedupe_by_id {
                if let Some(seen) = self.writer.find_message_id(state.id, &message.id)? {
                    positions.push(Position {
                        queue: seen.queue,
                        offset: seen.offset,
                    });
                    continue;
                }
            }
            let q = &mut state.queues[*queue as usize];
            let offset = q.next_offset;
            q.next_offset += 1;
            stored += 1;
            if dedupe_by_id {
                let at = StoredId {
                    stored_at_ms: at_ms,
                    queue: *queue,
                    offset,
                };
                self.writer.put_message_id(state.id, &message.id, at)?;
            }
            let (_, _, segment) = self
                .segments
                .entry((state.id, *queue))
                .or_insert_with(|| (offset, at_ms, Vec::new()));
            segment.push(RecordRef {
                message: Cow::Borrowed(message),
                producer: producer.map(|p| ProducerSequence {
                    producer_id: p.producer_id,
                    first_sequence: p.first_sequence + i as u64,
                }),
                body_in_log: body_at(i, &message.body),
            });
            self.touched.bytes += message.body.len() as u64;
            positions.push(Position {
                queue: *queue,
                offset,
            });
        }
        self.touched.messages += stored;
        if let Some(p) = producer {
            index.producers.entry(p.producer_id).or_default().record(
                p.first_sequence,
                positions.clone(),
                at_ms,
            );
            self.touched.producers.insert(p.producer_id);
        }
        self.touched.topics.insert(topic.to_string());
        Ok(Output::Appended(positions))
    }

    fn ack(&mut self, topic: &str, group: &str, offsets: &[(u32, u64)]) -> Output {
        let index = &mut self.machine.index;
        let Some(state) = index.topics.get(topic) else {
            return Output::Rejected(unknown_topic(topic));
        };
        let key = (group.to_string(), topic.to_string());
        let progress = index
            .progress
            .entry(key.clone())
            .or_insert_with(|| vec![QueueProgress::default(); state.queues.len()]);
        let mut applied = 0;
        for &(queue, offset) in offsets {
            let (Some(p), Some(q)) = (
                progress.get_mut(queue as usize),
                state.queues.get(queue as usize),
            ) else {
                continue;
            };
            // Only offsets that exist can be acked: a bogus ack must not move the floor past data.
            if offset < q.next_offset && p.ack(offset) {
                applied += 1;
            }
        }
        if applied > 0 {
            self.touched.progress.insert(key);
        }
        Output::Acked(applied)
    }

    fn dead_letter(
        &mut self,
        at_ms: u64,
        topic: &str,
        group: &str,
        offsets: &[(u32, u64)],
        records: &'b [(u32, escrow_proto::Message)],
    ) -> Result<Output, StorageError> {
        if offsets.len() != records.len() {
            return Ok(Output::Rejected(ErrorResponse::new(
                ErrorCode::INVALID_ARGUMENT,
                "dead letters and offsets differ in number",
            )));
        }
        let dlq = escrow_proto::dead_letter_topic(group);
        if !self.machine.index.topics.contains_key(&dlq) {
            if let Output::Rejected(e) = self.create_topic(at_ms, &dlq, 1)? {
                return Ok(Output::Rejected(e));
            }
        }
        let mut moved = 0;
        for (&(queue, offset), record) in offsets.iter().zip(records) {
            // Already acked (a repeated dead-letter command): moved once only.
            match self.ack(topic, group, &[(queue, offset)]) {
                Output::Acked(1) => {}
                Output::Rejected(e) => return Ok(Output::Rejected(e)),
                _ => continue,
            }
            self.append(at_ms, &dlq, None, std::slice::from_ref(record), false, None)?;
            moved += 1;
        }
        Ok(Output::Acked(moved))
    }

    fn redrive(
        &mut self,
        group: &str,
        dead_letters: &[u64],
        origins: &[(String, u32, u64)],
    ) -> Output {
        let dlq = escrow_proto::dead_letter_topic(group);
        let mut redriven = 0;
        for (&dead, (topic, queue, offset)) in dead_letters.iter().zip(origins) {
            if !matches!(
                self.ack(&dlq, REDRIVE_GROUP, &[(0, dead)]),
                Output::Acked(1)
            ) {
                continue;
            }
            let key = (group.to_string(), topic.clone());
            if let Some(p) = self
                .machine
                .index
                .progress
                .get_mut(&key)
                .and_then(|p| p.get_mut(*queue as usize))
            {
                if p.reopen(*offset) {
                    self.touched.progress.insert(key);
                }
            }
            redriven += 1;
        }
        Output::Acked(redriven)
    }

    /// Appends one message the log entry being applied does not hold (a committed or
    /// abandoned half message: its body, if not in `message`, is where `body_in_log` says).
    fn append_owned(
        &mut self,
        at_ms: u64,
        topic: &str,
        queue: u32,
        message: escrow_proto::Message,
        body_in_log: Option<BodyAt>,
    ) -> Option<Position> {
        let state = self.machine.index.topics.get_mut(topic)?;
        let q = state.queues.get_mut(queue as usize)?;
        let offset = q.next_offset;
        q.next_offset += 1;
        self.touched.bytes += message.body.len() as u64 + body_in_log.map_or(0, |b| b.len as u64);
        self.touched.messages += 1;
        self.touched.topics.insert(topic.to_string());
        let (_, _, segment) = self
            .segments
            .entry((state.id, queue))
            .or_insert_with(|| (offset, at_ms, Vec::new()));
        segment.push(RecordRef {
            message: Cow::Owned(message),
            producer: None,
            body_in_log,
        });
        Some(Position { queue, offset })
    }

    fn send_half(
        &mut self,
        at_ms: u64,
        half: &HalfMessage,
        first_check_at_ms: u64,
        body_in_log: Option<BodyAt>,
    ) -> Result<Output, StorageError> {
        let index = &mut self.machine.index;
        let Some(state) = index.topics.get(&half.topic) else {
            return Ok(Output::Rejected(unknown_topic(&half.topic)));
        };
        if half.queue as usize >= state.queues.len() {
            return Ok(Output::Rejected(ErrorResponse::new(
                ErrorCode::INVALID_ARGUMENT,
                format!(
                    "queue {} out of range for topic {:?}",
                    half.queue, half.topic
                ),
            )));
        }
        let key = (half.producer_group.clone(), half.message.id.clone());
        if let Some(id) = self.machine.half_ids.get(&key) {
            return Ok(Output::HalfStored(*id));
        }
        let id = index.next_txn_id;
        index.next_txn_id += 1;
        self.machine.half_ids.insert(key, id);
        let m = &half.message;
        let message = match body_in_log {
            // Everything but the body, which stays in the log entry.
            Some(_) => escrow_proto::Message {
                id: m.id.clone(),
                key: m.key.clone(),
                message_group: m.message_group.clone(),
                tags: m.tags.clone(),
                headers: m.headers.clone(),
                body: Vec::new(),
                born_at_ms: m.born_at_ms,
                deliver_at_ms: m.deliver_at_ms,
            },
            None => m.clone(),
        };
        let record = HalfRecord {
            topic: half.topic.clone(),
            queue: half.queue,
            producer_group: half.producer_group.clone(),
            instance: half.instance.clone(),
            message,
            stored_at_ms: at_ms,
            body_in_log,
        };
        let schedule = (0, first_check_at_ms);
        index.txns.insert(id, PendingTxn::new(&record, schedule));
        self.writer.put_half(id, record, schedule);
        self.touched.txns.insert(id);
        Ok(Output::HalfStored(id))
    }

    /// Removes a pending transaction from the index; returns the checks made of it.
    fn forget_pending(&mut self, txn_id: u64) -> Option<u32> {
        let pending = self.machine.index.txns.remove(&txn_id)?;
        self.machine
            .half_ids
            .remove(&(pending.producer_group, pending.message_id));
        self.touched.txns.insert(txn_id);
        Some(pending.checks)
    }

    fn end_txn(&mut self, at_ms: u64, txn_id: u64, commit: bool) -> Result<Output, StorageError> {
        if self.forget_pending(txn_id).is_none() {
            // Decided before: the same decision is answered again, a different one refused.
            let Some(state) = self.writer.txn_outcome::<TxnState>(txn_id)? else {
                return Ok(Output::Rejected(ErrorResponse::new(
                    ErrorCode::TXN_UNKNOWN,
                    format!("transaction {txn_id} is neither pending nor remembered"),
                )));
            };
            return Ok(match (state, commit) {
                (TxnState::Committed(_), true) | (TxnState::RolledBack, false) => {
                    Output::TxnEnded(state)
                }
                _ => Output::Rejected(ErrorResponse::new(
                    ErrorCode::TXN_CONFLICT,
                    format!(
                        "transaction {txn_id} was already {}; that decision stands",
                        describe(state)
                    ),
                )),
            });
        }
        let Some(record) = self.writer.take_half(txn_id)? else {
            return Err(StorageError::Corrupt {
                what: "half message",
                detail: format!("transaction {txn_id} is pending but not stored"),
            });
        };
        let state = if commit {
            match self.append_owned(
                at_ms,
                &record.topic,
                record.queue,
                record.message,
                record.body_in_log,
            ) {
                Some(position) => TxnState::Committed(position),
                // Its topic is gone (topics are never deleted today): nothing to commit into.
                None => TxnState::RolledBack,
            }
        } else {
            TxnState::RolledBack
        };
        self.writer
            .put_txn_outcome(txn_id, &state, REMEMBERED_OUTCOMES)?;
        Ok(Output::TxnEnded(state))
    }

    fn txn_checked(&mut self, checks: &[(u64, u64)]) -> Result<Output, StorageError> {
        let mut counted = 0;
        for &(id, next_check_at_ms) in checks {
            if let Some(txn) = self.machine.index.txns.get_mut(&id) {
                txn.checks += 1;
                txn.next_check_at_ms = next_check_at_ms;
                self.writer
                    .put_txn_schedule(id, (txn.checks, next_check_at_ms))?;
                self.touched.txns.insert(id);
                counted += 1;
            }
        }
        Ok(Output::Acked(counted))
    }

    fn abandon_txns(&mut self, at_ms: u64, txn_ids: &[u64]) -> Result<Output, StorageError> {
        let topic = escrow_proto::txn::ABANDONED_TOPIC;
        let mut moved = 0;
        for &id in txn_ids {
            let Some(checks) = self.forget_pending(id) else {
                continue;
            };
            if !self.machine.index.topics.contains_key(topic) {
                if let Output::Rejected(e) = self.create_topic(at_ms, topic, 1)? {
                    return Ok(Output::Rejected(e));
                }
            }
            let Some(record) = self.writer.take_half(id)? else {
                continue;
            };
            self.writer
                .put_txn_outcome(id, &TxnState::Abandoned, REMEMBERED_OUTCOMES)?;
            let mut message = record.message;
            for (name, value) in [
                ("escrow-txn-id", id.to_string()),
                ("escrow-txn-topic", record.topic),
                ("escrow-txn-producer-group", record.producer_group),
                ("escrow-txn-checks", checks.to_string()),
            ] {
                message.headers.insert(name.to_string(), value);
            }
            message.deliver_at_ms = None;
            self.append_owned(at_ms, topic, 0, message, record.body_in_log);
            moved += 1;
        }
        Ok(Output::Acked(moved))
    }

    fn expire_producers(&mut self, idle_before_ms: u64) -> Result<Output, StorageError> {
        let index = &mut self.machine.index;
        let idle: Vec<u64> = index
            .producers
            .iter()
            .filter(|(_, s)| s.last_seen_ms < idle_before_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &idle {
            index.producers.remove(id);
            self.touched.producers.insert(*id);
        }
        Ok(Output::Expired(idle.len() as u32))
    }
}

/// The error for a topic that does not exist.
pub fn unknown_topic(topic: &str) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::UNKNOWN_TOPIC,
        format!("topic {topic:?} does not exist"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use escrow_proto::Message;
    use std::sync::Arc;

    fn open(dir: &std::path::Path) -> StateMachine {
        StateMachine::open(Arc::new(Store::open(&dir.join("s.redb")).unwrap())).unwrap()
    }

    fn publish(topic: &str, producer_id: u64, first_sequence: u64, n: usize) -> Command {
        Command::Append {
            topic: topic.into(),
            producer: Some(ProducerSequence {
                producer_id,
                first_sequence,
            }),
            records: (0..n)
                .map(|i| (0, Message::new(format!("p{i}"), vec![1])))
                .collect(),
            dedupe_by_id: false,
        }
    }

    #[test]
    fn producer_retries_are_stored_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let create = Batch {
            at_ms: 1,
            commands: vec![Command::CreateTopic {
                name: "t".into(),
                queues: 1,
            }],
        };
        sm.apply(1, &create).unwrap();
        let first = sm
            .apply(
                2,
                &Batch {
                    at_ms: 2,
                    commands: vec![publish("t", 7, 0, 3)],
                },
            )
            .unwrap();
        let retry = sm
            .apply(
                3,
                &Batch {
                    at_ms: 3,
                    commands: vec![publish("t", 7, 0, 3)],
                },
            )
            .unwrap();
        assert_eq!(first, retry, "a retry answers with the original positions");
        assert_eq!(sm.index().topics["t"].queues[0].next_offset, 3);
        drop(sm);
        let mut sm = open(dir.path());
        let again = sm
            .apply(
                4,
                &Batch {
                    at_ms: 4,
                    commands: vec![publish("t", 7, 0, 3)],
                },
            )
            .unwrap();
        assert_eq!(again, first, "dedup state is durable");
        let next = sm
            .apply(
                5,
                &Batch {
                    at_ms: 5,
                    commands: vec![publish("t", 7, 3, 1)],
                },
            )
            .unwrap();
        assert_eq!(
            next,
            vec![Output::Appended(vec![Position {
                queue: 0,
                offset: 3
            }])]
        );
        let expired = sm
            .apply(
                6,
                &Batch {
                    at_ms: 6,
                    commands: vec![Command::ExpireProducers {
                        idle_before_ms: 100,
                    }],
                },
            )
            .unwrap();
        assert_eq!(expired, vec![Output::Expired(1)]);
        assert!(sm.index().producers.is_empty());
    }

    fn append(topic: &str, queue: u32, n: usize) -> Command {
        Command::Append {
            topic: topic.into(),
            producer: None,
            records: (0..n)
                .map(|i| (queue, Message::new(format!("m{i}"), vec![1, 2, 3])))
                .collect(),
            dedupe_by_id: false,
        }
    }

    #[test]
    fn apply_is_deterministic_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let batch = Batch {
            at_ms: 1000,
            commands: vec![
                Command::CreateTopic {
                    name: "t".into(),
                    queues: 2,
                },
                append("t", 1, 3),
                append("t", 1, 2),
                append("nope", 0, 1),
                Command::CreateTopic {
                    name: "t".into(),
                    queues: 2,
                },
                Command::Ack {
                    topic: "t".into(),
                    group: "g".into(),
                    offsets: vec![(1, 0), (1, 1), (1, 99)],
                },
            ],
        };
        let mut sm = open(dir.path());
        let outputs = sm.apply(1, &batch).unwrap();
        assert!(matches!(outputs[0], Output::TopicCreated(_)));
        assert_eq!(
            outputs[2],
            Output::Appended(vec![
                Position {
                    queue: 1,
                    offset: 3
                },
                Position {
                    queue: 1,
                    offset: 4
                }
            ])
        );
        assert!(matches!(&outputs[3], Output::Rejected(e) if e.code == ErrorCode::UNKNOWN_TOPIC));
        assert!(matches!(&outputs[4], Output::Rejected(e) if e.code == ErrorCode::TOPIC_EXISTS));
        assert_eq!(outputs[5], Output::Acked(2), "offset 99 does not exist");

        let other = tempfile::tempdir().unwrap();
        let mut twin = open(other.path());
        let twin_outputs = twin.apply(1, &batch).unwrap();
        assert_eq!(outputs, twin_outputs);

        drop(sm);
        let reopened = open(dir.path());
        assert_eq!(reopened.index().topics, twin.index().topics);
        assert_eq!(reopened.index().progress, twin.index().progress);
        assert_eq!(reopened.index().commit_index, 1);
    }

    #[test]
    fn message_ids_are_stored_once_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let ids = |ids: &[&str]| Command::Append {
            topic: "t".into(),
            producer: None,
            records: ids
                .iter()
                .map(|id| (0, Message::new(*id, b"x".to_vec())))
                .collect(),
            dedupe_by_id: true,
        };
        let at = |at_ms, commands| Batch { at_ms, commands };
        sm.apply(
            1,
            &at(
                10,
                vec![Command::CreateTopic {
                    name: "t".into(),
                    queues: 1,
                }],
            ),
        )
        .unwrap();
        let first = sm.apply(2, &at(10, vec![ids(&["a", "b", "a"])])).unwrap();
        let pos = |offset| Position { queue: 0, offset };
        assert_eq!(first, vec![Output::Appended(vec![pos(0), pos(1), pos(0)])]);
        let again = sm.apply(3, &at(20, vec![ids(&["b", "c"])])).unwrap();
        assert_eq!(again, vec![Output::Appended(vec![pos(1), pos(2)])]);
        assert_eq!(sm.index().topics["t"].queues[0].next_offset, 3);

        // A snapshot carries the ids: a node installing it deduplicates the same way.
        let image = sm.store().export(sm.store().freeze().unwrap()).unwrap();
        let other = tempfile::tempdir().unwrap();
        let mut twin = open(other.path());
        twin.install(&image).unwrap();
        let on_twin = twin.apply(4, &at(30, vec![ids(&["a"])])).unwrap();
        assert_eq!(on_twin, vec![Output::Appended(vec![pos(0)])]);

        let expire = |stored_before_ms, keep_at_most| Command::ExpireMessageIds {
            stored_before_ms,
            keep_at_most,
        };
        assert_eq!(
            sm.apply(4, &at(30, vec![expire(0, 2)])).unwrap(),
            vec![Output::Expired(1)],
            "over the count bound the oldest goes first"
        );
        assert_eq!(
            sm.apply(5, &at(30, vec![expire(15, 100)])).unwrap(),
            vec![Output::Expired(1)],
            "ids older than the window go"
        );
        let after = sm.apply(6, &at(40, vec![ids(&["a", "b", "c"])])).unwrap();
        assert_eq!(after, vec![Output::Appended(vec![pos(3), pos(4), pos(2)])]);
    }

    /// Creates topic `t` with one queue.
    fn topic_t() -> Command {
        Command::CreateTopic {
            name: "t".into(),
            queues: 1,
        }
    }

    /// A half message for topic `t`, queue 0, producer group `pg`.
    fn half(id: &str) -> Command {
        Command::SendHalf {
            half: Box::new(HalfMessage {
                topic: "t".into(),
                queue: 0,
                producer_group: "pg".into(),
                instance: "i1".into(),
                message: Message::new(id, b"x".to_vec()),
            }),
            first_check_at_ms: 100,
        }
    }

    #[test]
    fn transactions_are_decided_once_and_survive_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let at = |at_ms, commands| Batch { at_ms, commands };
        let out = sm
            .apply(1, &at(10, vec![topic_t(), half("a"), half("b"), half("a")]))
            .unwrap();
        assert_eq!(
            out[1..],
            [
                Output::HalfStored(1),
                Output::HalfStored(2),
                Output::HalfStored(1)
            ]
        );
        assert_eq!(
            sm.index().topics["t"].queues[0].next_offset,
            0,
            "half messages are invisible"
        );

        let end = |txn_id, commit| Command::EndTxn { txn_id, commit };
        let out = sm
            .apply(
                2,
                &at(
                    20,
                    vec![end(1, true), end(1, true), end(1, false), end(9, true)],
                ),
            )
            .unwrap();
        let committed = Output::TxnEnded(TxnState::Committed(Position {
            queue: 0,
            offset: 0,
        }));
        assert_eq!(out[0], committed);
        assert_eq!(
            out[1], committed,
            "the same decision again is answered the same"
        );
        assert!(matches!(&out[2], Output::Rejected(e) if e.code == ErrorCode::TXN_CONFLICT));
        assert!(matches!(&out[3], Output::Rejected(e) if e.code == ErrorCode::TXN_UNKNOWN));
        assert_eq!(sm.index().topics["t"].queues[0].next_offset, 1);

        // Checks counted and scheduled; a snapshot carries them.
        sm.apply(
            3,
            &at(
                30,
                vec![Command::TxnChecked {
                    checks: vec![(2, 500), (1, 500)],
                }],
            ),
        )
        .unwrap();
        assert_eq!(sm.index().txns[&2].checks, 1);
        let image = sm.store().export(sm.store().freeze().unwrap()).unwrap();
        let other = tempfile::tempdir().unwrap();
        let mut twin = open(other.path());
        twin.install(&image).unwrap();
        assert_eq!(twin.index().txns, sm.index().txns);
        assert_eq!(twin.index().next_txn_id, 3);

        let out = twin
            .apply(
                4,
                &at(
                    40,
                    vec![Command::AbandonTxns { txn_ids: vec![2] }, end(2, true)],
                ),
            )
            .unwrap();
        assert_eq!(out[0], Output::Acked(1));
        assert!(matches!(&out[1], Output::Rejected(e) if e.code == ErrorCode::TXN_CONFLICT));
        let abandoned = &twin.index().topics[escrow_proto::txn::ABANDONED_TOPIC];
        assert_eq!(abandoned.queues[0].next_offset, 1);
        assert_eq!(
            twin.index().topics["t"].queues[0].next_offset,
            1,
            "never delivered"
        );
        assert!(twin.index().txns.is_empty());
    }

    #[test]
    fn pending_half_messages_reach_the_tables_only_through_a_durable_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let at = |at_ms, commands| Batch { at_ms, commands };
        sm.apply(1, &at(10, vec![topic_t()])).unwrap();
        let apply_non_durably = |sm: &mut StateMachine, index, batch: Batch| {
            let mut applying = sm.begin().unwrap();
            let out = applying.apply(index, &batch).unwrap();
            applying.commit(index, false).unwrap();
            out
        };
        let out = apply_non_durably(&mut sm, 2, at(20, vec![half("a"), half("b")]));
        assert_eq!(out, [Output::HalfStored(1), Output::HalfStored(2)]);
        assert!(
            sm.store().read_half(1).unwrap().is_some(),
            "readable for checks"
        );
        assert!(sm.store().load().unwrap().txns.is_empty(), "in memory only");

        // Decided before any durable commit: never written to the tables.
        let end = |txn_id, commit| Command::EndTxn { txn_id, commit };
        apply_non_durably(&mut sm, 3, at(30, vec![end(1, true)]));
        apply_non_durably(
            &mut sm,
            4,
            at(
                40,
                vec![Command::TxnChecked {
                    checks: vec![(2, 900)],
                }],
            ),
        );
        assert!(sm.store().read_half(1).unwrap().is_none());

        // A durable commit writes what is still pending, with its schedule.
        sm.begin().unwrap().commit(4, true).unwrap();
        let stored = sm.store().load().unwrap().txns;
        assert_eq!(stored.len(), 1);
        assert_eq!((stored[0].0, stored[0].2), (2, (1, 900)));
        drop(sm);
        let mut sm = open(dir.path());
        assert_eq!(sm.index().txns.len(), 1);
        assert_eq!(sm.index().txns[&2].checks, 1);

        // Decided after the flush: removed from the tables.
        let out = sm.apply(5, &at(50, vec![end(2, false)])).unwrap();
        assert_eq!(out, [Output::TxnEnded(TxnState::RolledBack)]);
        assert!(sm.store().load().unwrap().txns.is_empty());
        assert!(sm.store().read_half(2).unwrap().is_none());
        assert_eq!(sm.index().topics["t"].queues[0].next_offset, 1);
    }

    #[test]
    fn outcomes_reach_the_table_only_through_a_durable_commit() {
        let dir = tempfile::tempdir().unwrap();
        let at = |at_ms, commands| Batch { at_ms, commands };
        let end = |txn_id, commit| Command::EndTxn { txn_id, commit };
        let refused = |out: &[Output], code| matches!(out, [Output::Rejected(e)] if e.code == code);
        let mut sm = open(dir.path());
        sm.apply(1, &at(10, vec![topic_t(), half("a")])).unwrap();
        let (commit, rollback) = (at(20, vec![end(1, true)]), at(30, vec![end(1, false)]));
        let mut applying = sm.begin().unwrap();
        let out = applying.apply(2, &commit).unwrap();
        applying.commit(2, false).unwrap();
        assert!(matches!(
            out[..],
            [Output::TxnEnded(TxnState::Committed(_))]
        ));
        // Remembered in memory: a conflicting decision is refused, the same one repeated.
        let mut applying = sm.begin().unwrap();
        let out = applying.apply(3, &rollback).unwrap();
        assert!(refused(&out, ErrorCode::TXN_CONFLICT), "{out:?}");
        let out = applying.apply(4, &commit).unwrap();
        assert!(matches!(
            out[..],
            [Output::TxnEnded(TxnState::Committed(_))]
        ));
        applying.commit(3, false).unwrap();
        assert!(
            sm.store().outcome_ids().unwrap().is_empty(),
            "in memory only"
        );

        // A durable commit writes it; it outlives a reopen.
        sm.begin().unwrap().commit(3, true).unwrap();
        assert_eq!(sm.store().outcome_ids().unwrap(), [1]);
        drop(sm);
        let mut sm = open(dir.path());
        assert!(sm.index().txns.is_empty());
        let out = sm.apply(4, &rollback).unwrap();
        assert!(refused(&out, ErrorCode::TXN_CONFLICT), "{out:?}");
        let out = sm.apply(5, &at(40, vec![end(9, true)])).unwrap();
        assert!(refused(&out, ErrorCode::TXN_UNKNOWN), "{out:?}");
    }
}
