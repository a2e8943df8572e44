//! The deterministic state machine: commands in, durable state and outputs out.
//!
//! [`StateMachine::apply`] is the only writer of replicated state. Given the same
//! batches in the same order it produces the same stored bytes and outputs on every
//! node; it reads no clock (the batch carries its time) and no leader-local state.

pub mod command;
pub mod progress;

use crate::storage::{Loaded, Record, StorageError, Store, TopicRecord, Writer};
use command::{Batch, Command, Output};
use escrow_proto::{
    ErrorCode, ErrorResponse, Position, ProducerSequence, QueueInfo, TopicInfo, MAX_QUEUES,
};
use progress::QueueProgress;
use std::collections::{BTreeMap, HashMap, HashSet};

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
    /// Last applied commit index.
    pub commit_index: u64,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicState>,
    /// Group progress per `(group, topic)`, one entry per queue.
    pub progress: HashMap<GroupTopic, Vec<QueueProgress>>,
}

impl Index {
    fn from_loaded(loaded: Loaded) -> Index {
        let mut index = Index {
            commit_index: loaded.commit_index,
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

/// What a batch changed, so the shared view can be refreshed after the commit.
#[derive(Debug, Default)]
pub struct Touched {
    /// Topics created or appended to.
    pub topics: HashSet<String>,
    /// Group progress changed.
    pub progress: HashSet<GroupTopic>,
}

/// Owner of the durable state: the store and the authoritative index.
#[derive(Debug)]
pub struct StateMachine {
    store: std::sync::Arc<Store>,
    index: Index,
}

impl StateMachine {
    /// Loads the state machine from its store.
    pub fn open(store: std::sync::Arc<Store>) -> Result<StateMachine, StorageError> {
        let index = Index::from_loaded(store.load()?);
        Ok(StateMachine { store, index })
    }

    /// The authoritative index (as of the last applied batch).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Applies a batch in one durable write transaction.
    ///
    /// On a storage error the in-memory index may be ahead of disk: the caller must
    /// stop applying (the error is fatal for this state machine).
    pub fn apply(&mut self, batch: &Batch) -> Result<(Vec<Output>, Touched), StorageError> {
        let mut writer = self.store.begin()?;
        let mut touched = Touched::default();
        let mut segments: BTreeMap<(u32, u32), (u64, Vec<Record>)> = BTreeMap::new();
        let mut outputs = Vec::with_capacity(batch.commands.len());
        for command in &batch.commands {
            let output = match command {
                Command::CreateTopic { name, queues } => {
                    self.create_topic(&mut writer, batch.at_ms, name, *queues, &mut touched)?
                }
                Command::Append {
                    topic,
                    producer,
                    records,
                } => self.append(topic, *producer, records, &mut segments, &mut touched),
                Command::Ack {
                    topic,
                    group,
                    offsets,
                } => self.ack(topic, group, offsets, &mut touched),
            };
            outputs.push(output);
        }
        for ((topic_id, queue), (base, records)) in &segments {
            writer.put_segment(*topic_id, *queue, *base, batch.at_ms, records)?;
        }
        for key in &touched.progress {
            let (Some(topic), Some(progress)) =
                (self.index.topics.get(&key.1), self.index.progress.get(key))
            else {
                continue;
            };
            for (queue, p) in progress.iter().enumerate() {
                writer.put_progress(&key.0, topic.id, queue as u32, p)?;
            }
        }
        self.index.commit_index += 1;
        writer.commit(self.index.commit_index)?;
        Ok((outputs, touched))
    }

    fn create_topic(
        &mut self,
        writer: &mut Writer,
        at_ms: u64,
        name: &str,
        queues: u32,
        touched: &mut Touched,
    ) -> Result<Output, StorageError> {
        if self.index.topics.contains_key(name) {
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
        let id = self.index.topics.values().map(|t| t.id).max().unwrap_or(0) + 1;
        let record = TopicRecord {
            id,
            queues,
            created_at_ms: at_ms,
        };
        writer.put_topic(name, &record)?;
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
        self.index.topics.insert(name.to_string(), state);
        touched.topics.insert(name.to_string());
        Ok(Output::TopicCreated(info))
    }

    fn append(
        &mut self,
        topic: &str,
        producer: Option<ProducerSequence>,
        records: &[(u32, escrow_proto::Message)],
        segments: &mut BTreeMap<(u32, u32), (u64, Vec<Record>)>,
        touched: &mut Touched,
    ) -> Output {
        let Some(state) = self.index.topics.get_mut(topic) else {
            return Output::Rejected(unknown_topic(topic));
        };
        if let Some((queue, _)) = records
            .iter()
            .find(|(q, _)| *q as usize >= state.queues.len())
        {
            return Output::Rejected(ErrorResponse::new(
                ErrorCode::INVALID_ARGUMENT,
                format!("queue {queue} out of range for topic {topic:?}"),
            ));
        }
        let mut positions = Vec::with_capacity(records.len());
        for (i, (queue, message)) in records.iter().enumerate() {
            let q = &mut state.queues[*queue as usize];
            let offset = q.next_offset;
            q.next_offset += 1;
            let (_, segment) = segments
                .entry((state.id, *queue))
                .or_insert_with(|| (offset, Vec::new()));
            segment.push(Record {
                message: message.clone(),
                producer: producer.map(|p| ProducerSequence {
                    producer_id: p.producer_id,
                    first_sequence: p.first_sequence + i as u64,
                }),
            });
            positions.push(Position {
                queue: *queue,
                offset,
            });
        }
        touched.topics.insert(topic.to_string());
        Output::Appended(positions)
    }

    fn ack(
        &mut self,
        topic: &str,
        group: &str,
        offsets: &[(u32, u64)],
        touched: &mut Touched,
    ) -> Output {
        let Some(state) = self.index.topics.get(topic) else {
            return Output::Rejected(unknown_topic(topic));
        };
        let key = (group.to_string(), topic.to_string());
        let progress = self
            .index
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
            touched.progress.insert(key);
        }
        Output::Acked(applied)
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

    fn append(topic: &str, queue: u32, n: usize) -> Command {
        Command::Append {
            topic: topic.into(),
            producer: None,
            records: (0..n)
                .map(|i| (queue, Message::new(format!("m{i}"), vec![1, 2, 3])))
                .collect(),
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
        let (outputs, _) = sm.apply(&batch).unwrap();
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
        let (twin_outputs, _) = twin.apply(&batch).unwrap();
        assert_eq!(outputs, twin_outputs);

        drop(sm);
        let reopened = open(dir.path());
        assert_eq!(reopened.index().topics, twin.index().topics);
        assert_eq!(reopened.index().progress, twin.index().progress);
        assert_eq!(reopened.index().commit_index, 1);
    }
}
