//! Fault injection for Raft traffic: drop or delay messages between chosen nodes.
//!
//! Checked by the sending side of [`super::network`]. Tests share one filter among the
//! nodes of an in-process cluster (raft-rs's `isolate`/`cut`/`recover`, TiKV's filters).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// Rules for `(from, to)` pairs of node ids.
#[derive(Debug, Default)]
pub struct NetworkFilter {
    rules: Mutex<Rules>,
}

#[derive(Debug, Default)]
struct Rules {
    cut: HashSet<(u64, u64)>,
    isolated: HashSet<u64>,
    delay: HashMap<(u64, u64), Duration>,
}

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it (after the delay, if any).
    Pass(Option<Duration>),
    /// Drop it: the sender sees the peer as unreachable.
    Drop,
}

impl NetworkFilter {
    fn rules(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every message to and from `node`.
    pub fn isolate(&self, node: u64) {
        self.rules().isolated.insert(node);
    }

    /// Drops messages from `a` to `b` and from `b` to `a`.
    pub fn cut(&self, a: u64, b: u64) {
        let mut r = self.rules();
        r.cut.insert((a, b));
        r.cut.insert((b, a));
    }

    /// Delays messages from `from` to `to`.
    pub fn delay(&self, from: u64, to: u64, by: Duration) {
        self.rules().delay.insert((from, to), by);
    }

    /// Removes every rule.
    pub fn heal(&self) {
        *self.rules() = Rules::default();
    }

    /// The verdict for a message from `from` to `to`.
    pub fn check(&self, from: u64, to: u64) -> Verdict {
        let r = self.rules();
        if r.isolated.contains(&from) || r.isolated.contains(&to) || r.cut.contains(&(from, to)) {
            return Verdict::Drop;
        }
        Verdict::Pass(r.delay.get(&(from, to)).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let f = NetworkFilter::default();
        assert_eq!(f.check(1, 2), Verdict::Pass(None));
        f.isolate(1);
        assert_eq!(f.check(1, 2), Verdict::Drop);
        assert_eq!(f.check(3, 1), Verdict::Drop);
        assert_eq!(f.check(2, 3), Verdict::Pass(None));
        f.heal();
        f.cut(2, 3);
        assert_eq!(f.check(3, 2), Verdict::Drop);
        f.delay(1, 2, Duration::from_millis(5));
        assert_eq!(f.check(1, 2), Verdict::Pass(Some(Duration::from_millis(5))));
    }
}
