//! A consumer group's acknowledged offsets in one queue.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Acked offsets of one queue for one group: everything below `floor`, plus `above`.
///
/// Replicated state: changed only by applied `Ack` commands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueProgress {
    /// Every offset below this is acked.
    pub floor: u64,
    /// Acked offsets at or above `floor` (sparse: out-of-order acks).
    pub above: BTreeSet<u64>,
    /// Offsets acked once and brought back by a dead-letter redrive: unacked again.
    pub reopened: BTreeSet<u64>,
}

impl QueueProgress {
    /// Whether `offset` is acked.
    pub fn is_acked(&self, offset: u64) -> bool {
        (offset < self.floor || self.above.contains(&offset)) && !self.reopened.contains(&offset)
    }

    /// Marks `offset` acked; returns false if it already was.
    pub fn ack(&mut self, offset: u64) -> bool {
        if self.reopened.remove(&offset) {
            return true;
        }
        if self.is_acked(offset) {
            return false;
        }
        self.above.insert(offset);
        while self.above.remove(&self.floor) {
            self.floor += 1;
        }
        true
    }

    /// Makes an acked `offset` unacked again (redrive); returns false if it was not acked.
    pub fn reopen(&mut self, offset: u64) -> bool {
        self.is_acked(offset) && self.reopened.insert(offset)
    }

    /// Moves the floor up to `low` (messages below it are no longer retained).
    pub fn raise_floor(&mut self, low: u64) {
        if low > self.floor {
            self.floor = low;
            self.above = self.above.split_off(&low);
            self.reopened = self.reopened.split_off(&low);
            while self.above.remove(&self.floor) {
                self.floor += 1;
            }
        }
    }

    /// Acked messages among `[low, next)`.
    pub fn acked_count(&self, next: u64) -> u64 {
        (self.floor.min(next) + self.above.range(..next).count() as u64)
            .saturating_sub(self.reopened.range(..next).count() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_advance_the_floor() {
        let mut p = QueueProgress::default();
        assert!(p.ack(2));
        assert!(p.ack(1));
        assert_eq!(p.floor, 0);
        assert!(!p.is_acked(0));
        assert!(p.ack(0));
        assert_eq!(p.floor, 3);
        assert!(p.above.is_empty());
        assert!(!p.ack(1), "double ack is a no-op");
        assert!(p.ack(5));
        assert_eq!(p.acked_count(10), 4);
        assert!(p.reopen(1));
        assert!(!p.is_acked(1));
        assert_eq!(p.acked_count(10), 3);
        assert!(!p.reopen(7), "only acked offsets can be reopened");
        assert!(p.ack(1), "a reopened offset can be acked again");
        assert_eq!(p.acked_count(10), 4);
        p.raise_floor(5);
        assert_eq!(p.floor, 6);
        assert!(p.above.is_empty());
    }
}
