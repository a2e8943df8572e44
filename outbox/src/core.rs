//! The relay's decisions, without I/O: which claimed rows may be published now (per-key
//! order), how they are packed into publish requests, and what a failure does to a row.
//!
//! Time never comes from a clock here: delays are returned as durations and the store
//! applies them with its own clock (PostgreSQL's `now()`, or the caller's `now_ms`).

use crate::OutboxRow;
use escrow_proto::ErrorCode;
use std::collections::HashMap;
use std::time::Duration;

/// How often a failing row is retried before it is parked, and how long to wait between tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts (permanent failures) after which a row is parked.
    pub max_attempts: u32,
    /// Delay after the first failure; doubled after each further one.
    pub first_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Ten attempts, 500 ms doubling up to one minute.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// What happens to a row that failed for the `attempts`-th time (counting this one).
    pub fn after_failure(&self, attempts: u32) -> Failed {
        if attempts >= self.max_attempts.max(1) {
            return Failed::Park;
        }
        let doublings = attempts.saturating_sub(1).min(30);
        let delay = self
            .first_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff);
        Failed::RetryIn(delay)
    }
}

/// The fate of a row after a permanent failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// Try again after this delay; later rows of its key wait.
    RetryIn(Duration),
    /// Give up: the row is parked with its last error and no longer blocks its key.
    Park,
}

/// How the relay treats a publish error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not the row's fault (connection, leader change, overload): release the claim and
    /// back off the whole relay; the row's attempts are not counted.
    Transient,
    /// The broker refused the message itself (unknown topic, too large, invalid): counts
    /// as an attempt of the row.
    Permanent,
}

/// Classifies a publish error by its stable code; no code means the connection failed.
pub fn classify(code: Option<ErrorCode>) -> ErrorKind {
    match code {
        None => ErrorKind::Transient,
        Some(c) if c.is_retryable() || c == ErrorCode::STORAGE_FAILURE => ErrorKind::Transient,
        Some(_) => ErrorKind::Permanent,
    }
}

/// What a store knows about the pending rows of one key when rows were claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHead {
    /// The oldest pending row of the key (claimed by anyone, or waiting for a retry).
    pub first_pending: u64,
    /// Pending rows of the key with an id up to the largest one this claim holds.
    pub pending_up_to_claimed: u64,
}

/// Keeps the claimed rows that may be published without overtaking an older row of
/// their key: a key's rows go only if its oldest pending row is among them, and all of
/// them only if no other pending row sits between them (else just the oldest).
///
/// `rows` must be in id order. Keyless rows carry no order and always go. Returns the
/// publishable rows (id order) and the ids held back for a later round.
pub fn publishable(
    rows: Vec<OutboxRow>,
    heads: &HashMap<String, KeyHead>,
) -> (Vec<OutboxRow>, Vec<u64>) {
    let mut claimed_per_key: HashMap<String, u64> = HashMap::new();
    let mut first_per_key: HashMap<String, u64> = HashMap::new();
    for row in &rows {
        if let Some(key) = &row.key {
            *claimed_per_key.entry(key.clone()).or_default() += 1;
            first_per_key.entry(key.clone()).or_insert(row.id);
        }
    }
    let verdict: HashMap<String, KeyVerdict> = first_per_key
        .iter()
        .map(|(key, &first)| {
            let claimed = claimed_per_key.get(key).copied().unwrap_or(0);
            let verdict = match heads.get(key) {
                Some(h) if h.first_pending == first && h.pending_up_to_claimed == claimed => {
                    KeyVerdict::All
                }
                Some(h) if h.first_pending == first => KeyVerdict::OldestOnly,
                // An older row is claimed elsewhere or waits for a retry; or the key's
                // rows vanished (sent by another relay): publish nothing of it now.
                _ => KeyVerdict::None,
            };
            (key.clone(), verdict)
        })
        .collect();
    let mut keep = Vec::with_capacity(rows.len());
    let mut held = Vec::new();
    for row in rows {
        let go = match row.key.as_deref() {
            None => true,
            Some(key) => match verdict.get(key) {
                Some(KeyVerdict::All) => true,
                Some(KeyVerdict::OldestOnly) => first_per_key.get(key) == Some(&row.id),
                _ => false,
            },
        };
        if go {
            keep.push(row);
        } else {
            held.push(row.id);
        }
    }
    (keep, held)
}

#[derive(Clone, Copy, Debug)]
enum KeyVerdict {
    All,
    OldestOnly,
    None,
}

/// Rows that travel in one publish request (one topic; a key's rows never split
/// between two requests, so a failed request cannot let a later row of its key overtake).
#[derive(Debug, PartialEq, Eq)]
pub struct PublishRequest {
    /// The topic of every row.
    pub topic: String,
    /// Rows in id order.
    pub rows: Vec<OutboxRow>,
}

/// Packs publishable rows (id order) into requests of at most `max_messages` rows and
/// about `max_bytes` body bytes. A key's rows that do not fit in one request are held
/// back from the first one that does not fit (returned as held ids).
pub fn pack(
    rows: Vec<OutboxRow>,
    max_messages: usize,
    max_bytes: usize,
) -> (Vec<PublishRequest>, Vec<u64>) {
    let max_messages = max_messages.max(1);
    // Group by topic, then by key (keyless rows each form their own group), keeping id order.
    let mut topics: Vec<(String, Vec<Vec<OutboxRow>>)> = Vec::new();
    let mut group_of: HashMap<(String, String), (usize, usize)> = HashMap::new();
    for row in rows {
        let t = match topics.iter().position(|(t, _)| *t == row.topic) {
            Some(t) => t,
            None => {
                topics.push((row.topic.clone(), Vec::new()));
                topics.len() - 1
            }
        };
        match row.key.clone() {
            Some(key) => {
                let slot = (row.topic.clone(), key);
                match group_of.get(&slot) {
                    Some(&(t, g)) => topics[t].1[g].push(row),
                    None => {
                        group_of.insert(slot, (t, topics[t].1.len()));
                        topics[t].1.push(vec![row]);
                    }
                }
            }
            None => topics[t].1.push(vec![row]),
        }
    }
    let mut requests = Vec::new();
    let mut held = Vec::new();
    for (topic, groups) in topics {
        let mut current: Vec<OutboxRow> = Vec::new();
        let mut bytes = 0usize;
        for group in groups {
            let group_bytes: usize = group.iter().map(|r| r.body.len()).sum();
            if !current.is_empty()
                && (current.len() + group.len() > max_messages || bytes + group_bytes > max_bytes)
            {
                requests.push(finish(&topic, std::mem::take(&mut current)));
                bytes = 0;
            }
            // A group larger than a whole request: send the prefix that fits, hold the rest.
            let mut holding = false;
            for row in group {
                let fits = current.is_empty()
                    || (current.len() < max_messages && bytes + row.body.len() <= max_bytes);
                if fits && !holding {
                    bytes += row.body.len();
                    current.push(row);
                } else {
                    holding = true;
                    held.push(row.id);
                }
            }
        }
        if !current.is_empty() {
            requests.push(finish(&topic, current));
        }
    }
    (requests, held)
}

fn finish(topic: &str, mut rows: Vec<OutboxRow>) -> PublishRequest {
    rows.sort_by_key(|r| r.id);
    PublishRequest {
        topic: topic.to_string(),
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn row(id: u64, topic: &str, key: Option<&str>, len: usize) -> OutboxRow {
        OutboxRow {
            id,
            message_id: format!("t-{id}"),
            topic: topic.into(),
            key: key.map(Into::into),
            headers: BTreeMap::new(),
            body: vec![0; len],
            attempts: 0,
            created_at_ms: 0,
        }
    }

    fn ids(rows: &[OutboxRow]) -> Vec<u64> {
        rows.iter().map(|r| r.id).collect()
    }

    #[test]
    fn backoff_doubles_then_parks() {
        let p = RetryPolicy {
            max_attempts: 4,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
        };
        assert_eq!(
            p.after_failure(1),
            Failed::RetryIn(Duration::from_millis(100))
        );
        assert_eq!(
            p.after_failure(2),
            Failed::RetryIn(Duration::from_millis(200))
        );
        assert_eq!(
            p.after_failure(3),
            Failed::RetryIn(Duration::from_millis(250))
        );
        assert_eq!(p.after_failure(4), Failed::Park);
        assert_eq!(p.after_failure(40), Failed::Park);
    }

    #[test]
    fn errors_are_classified_by_code() {
        assert_eq!(classify(None), ErrorKind::Transient);
        assert_eq!(classify(Some(ErrorCode::NOT_LEADER)), ErrorKind::Transient);
        assert_eq!(
            classify(Some(ErrorCode::UNKNOWN_TOPIC)),
            ErrorKind::Permanent
        );
        assert_eq!(
            classify(Some(ErrorCode::MESSAGE_TOO_LARGE)),
            ErrorKind::Permanent
        );
    }

    #[test]
    fn a_key_goes_only_when_its_oldest_pending_row_is_claimed() {
        let rows = vec![
            row(5, "t", Some("a"), 1),
            row(6, "t", Some("b"), 1),
            row(7, "t", Some("a"), 1),
            row(8, "t", None, 1),
            row(9, "t", Some("c"), 1),
            row(11, "t", Some("c"), 1),
        ];
        let heads = HashMap::from([
            // a: 5 and 7 are its only pending rows up to 7.
            (
                "a".to_string(),
                KeyHead {
                    first_pending: 5,
                    pending_up_to_claimed: 2,
                },
            ),
            // b: row 2 is older and claimed by another relay.
            (
                "b".to_string(),
                KeyHead {
                    first_pending: 2,
                    pending_up_to_claimed: 2,
                },
            ),
            // c: row 10 sits between 9 and 11 (waiting for a retry).
            (
                "c".to_string(),
                KeyHead {
                    first_pending: 9,
                    pending_up_to_claimed: 3,
                },
            ),
        ]);
        let (keep, held) = publishable(rows, &heads);
        assert_eq!(ids(&keep), vec![5, 7, 8, 9]);
        assert_eq!(held, vec![6, 11]);
    }

    #[test]
    fn keys_never_split_between_requests() {
        let rows = vec![
            row(1, "t", Some("a"), 10),
            row(2, "t", Some("b"), 10),
            row(3, "u", Some("a"), 10),
            row(4, "t", Some("a"), 10),
            row(5, "t", None, 10),
        ];
        let (requests, held) = pack(rows, 2, 1000);
        assert!(held.is_empty());
        let shape: Vec<(String, Vec<u64>)> = requests
            .iter()
            .map(|r| (r.topic.clone(), ids(&r.rows)))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("t".to_string(), vec![1, 4]),
                ("t".to_string(), vec![2, 5]),
                ("u".to_string(), vec![3]),
            ]
        );
    }

    #[test]
    fn an_oversized_key_sends_its_prefix_and_holds_the_rest() {
        let rows = vec![
            row(1, "t", Some("a"), 10),
            row(2, "t", Some("a"), 10),
            row(3, "t", Some("a"), 10),
            row(4, "t", Some("b"), 10),
        ];
        let (requests, held) = pack(rows, 10, 25);
        let shape: Vec<Vec<u64>> = requests.iter().map(|r| ids(&r.rows)).collect();
        assert_eq!(shape, vec![vec![1, 2], vec![4]]);
        assert_eq!(held, vec![3]);
    }
}
