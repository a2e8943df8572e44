//! Idempotent producers: which sequences of a producer are stored already (G5).
//!
//! Replicated state, changed only by applied commands, so a retry after a lost ack
//! or a leader change is recognised identically on every node.

use escrow_proto::Position;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Batches whose positions are remembered for answering retries.
const REMEMBERED_BATCHES: usize = 64;
/// Most out-of-order batches tracked above the floor before the oldest gap is given up.
const MAX_RANGES: usize = 1024;

/// What is known of one producer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    /// Every sequence below this is stored.
    pub floor: u64,
    /// Stored batches at or above the floor: first sequence -> length.
    pub ranges: BTreeMap<u64, u64>,
    /// Positions of the most recent batches: `(first sequence, positions as runs)`.
    pub recent: VecDeque<(u64, Vec<Run>)>,
    /// Commit time of the last batch (for idle expiry).
    pub last_seen_ms: u64,
}

/// Consecutive offsets in one queue: how a batch's positions are remembered compactly
/// (a keyless batch is one run), since this state is rewritten with every publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Queue.
    pub queue: u32,
    /// First offset.
    pub offset: u64,
    /// Number of consecutive offsets.
    pub len: u32,
}

fn to_runs(positions: &[Position]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for p in positions {
        match runs.last_mut() {
            Some(r) if r.queue == p.queue && r.offset + u64::from(r.len) == p.offset => r.len += 1,
            _ => runs.push(Run {
                queue: p.queue,
                offset: p.offset,
                len: 1,
            }),
        }
    }
    runs
}

fn from_runs(runs: &[Run]) -> Vec<Position> {
    runs.iter()
        .flat_map(|r| {
            (0..u64::from(r.len)).map(move |i| Position {
                queue: r.queue,
                offset: r.offset + i,
            })
        })
        .collect()
}

/// Outcome of looking up a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not stored yet.
    New,
    /// Stored already, at these positions.
    Duplicate(Vec<Position>),
    /// Stored already, too long ago to remember where.
    Forgotten,
}

impl ProducerState {
    /// Whether the batch starting at `first` is stored.
    pub fn lookup(&self, first: u64) -> Seen {
        let stored = first < self.floor || self.ranges.contains_key(&first);
        if !stored {
            return Seen::New;
        }
        match self.recent.iter().find(|(s, _)| *s == first) {
            Some((_, runs)) => Seen::Duplicate(from_runs(runs)),
            None => Seen::Forgotten,
        }
    }

    /// Records a stored batch.
    pub fn record(&mut self, first: u64, positions: Vec<Position>, at_ms: u64) {
        let len = positions.len() as u64;
        self.last_seen_ms = at_ms;
        if first >= self.floor {
            self.ranges.insert(first, len);
        }
        while let Some(len) = self.ranges.remove(&self.floor) {
            self.floor += len;
        }
        if self.ranges.len() > MAX_RANGES {
            // A batch that never arrived (the producer gave up on it) must not pin memory forever.
            if let Some((&start, &len)) = self.ranges.iter().next() {
                self.ranges.remove(&start);
                self.floor = start + len;
                while let Some(len) = self.ranges.remove(&self.floor) {
                    self.floor += len;
                }
            }
        }
        self.recent.push_back((first, to_runs(&positions)));
        while self.recent.len() > REMEMBERED_BATCHES {
            self.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(n: u64) -> Vec<Position> {
        (0..n)
            .map(|o| Position {
                queue: 0,
                offset: o,
            })
            .collect()
    }

    #[test]
    fn retries_are_recognised_in_any_order() {
        let mut p = ProducerState::default();
        assert_eq!(p.lookup(0), Seen::New);
        p.record(3, pos(2), 1); // batch [3,5) arrives before [0,3)
        assert_eq!(p.floor, 0);
        assert_eq!(p.lookup(3), Seen::Duplicate(pos(2)));
        assert_eq!(p.lookup(0), Seen::New);
        p.record(0, pos(3), 2);
        assert_eq!(p.floor, 5);
        assert!(p.ranges.is_empty());
        assert_eq!(p.lookup(0), Seen::Duplicate(pos(3)));
        assert_eq!(p.lookup(5), Seen::New);
        for i in 0..100 {
            p.record(5 + i, pos(1), 3);
        }
        assert_eq!(p.lookup(0), Seen::Forgotten);
        assert_eq!(p.recent.len(), REMEMBERED_BATCHES);
    }

    #[test]
    fn positions_round_trip_through_runs() {
        let positions = vec![
            Position {
                queue: 1,
                offset: 5,
            },
            Position {
                queue: 1,
                offset: 6,
            },
            Position {
                queue: 2,
                offset: 0,
            },
            Position {
                queue: 1,
                offset: 7,
            },
        ];
        let runs = to_runs(&positions);
        assert_eq!(runs.len(), 3);
        assert_eq!(from_runs(&runs), positions);
        assert_eq!(to_runs(&pos(256)).len(), 1);
    }
}
