//! Messages as producers send them and consumers receive them.

use crate::error::{ErrorCode, ErrorResponse};
use crate::limits::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message as a producer publishes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id chosen by the producer (stable across retries).
    pub id: String,
    /// Routing key: messages with one key go to one queue.
    pub key: Option<String>,
    /// FIFO message group: routes like a key and is delivered one at a time.
    pub message_group: Option<String>,
    /// Tags for filtering.
    pub tags: Vec<String>,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// The payload.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// When the producer created it (milliseconds since the Unix epoch).
    pub born_at_ms: u64,
    /// Deliver no earlier than this time (milliseconds since the Unix epoch).
    pub deliver_at_ms: Option<u64>,
}

impl Message {
    /// A message with a body and id; everything else empty.
    pub fn new(id: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Message {
            id: id.into(),
            body: body.into(),
            ..Message::default()
        }
    }

    /// Bytes of key, group, tags and headers.
    pub fn metadata_len(&self) -> usize {
        self.key.as_ref().map_or(0, String::len)
            + self.message_group.as_ref().map_or(0, String::len)
            + self.tags.iter().map(String::len).sum::<usize>()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Checks the per-message limits.
    pub fn validate(&self) -> Result<(), ErrorResponse> {
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN {
            return Err(ErrorResponse::new(
                ErrorCode::INVALID_ARGUMENT,
                format!("message id must be 1..={MAX_ID_LEN} bytes"),
            ));
        }
        if self.body.len() > MAX_BODY_LEN {
            return Err(ErrorResponse::new(
                ErrorCode::MESSAGE_TOO_LARGE,
                format!(
                    "body of {} bytes exceeds the limit of {MAX_BODY_LEN}",
                    self.body.len()
                ),
            ));
        }
        let too_long_key = |k: &Option<String>| k.as_ref().is_some_and(|k| k.len() > MAX_KEY_LEN);
        if too_long_key(&self.key) || too_long_key(&self.message_group) {
            return Err(ErrorResponse::new(
                ErrorCode::INVALID_ARGUMENT,
                format!("key and message group must be at most {MAX_KEY_LEN} bytes"),
            ));
        }
        if self.tags.len() > MAX_TAGS
            || self.headers.len() > MAX_HEADERS
            || self.metadata_len() > MAX_METADATA_LEN
        {
            return Err(ErrorResponse::new(
                ErrorCode::MESSAGE_TOO_LARGE,
                format!(
                    "metadata exceeds the limits ({MAX_TAGS} tags, {MAX_HEADERS} headers, {MAX_METADATA_LEN} bytes)"
                ),
            ));
        }
        Ok(())
    }
}

/// Where a published message was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Queue (partition) within the topic.
    pub queue: u32,
    /// Offset within the queue.
    pub offset: u64,
}

/// Identifies one lease of one message to one consumer group.
///
/// Clients treat it as opaque and hand it back to ack, nack or extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReceiptHandle {
    /// Queue of the message.
    pub queue: u32,
    /// Offset of the message.
    pub offset: u64,
    /// Which lease of the message this is; a redelivery gets a new one.
    pub lease: u64,
}

/// Whether a name is reserved for the broker's own topics and groups (`%DLQ%<group>`).
pub fn is_reserved(name: &str) -> bool {
    name.starts_with('%')
}

/// Checks a consumer-group name: a valid name, not reserved, short enough that its
/// dead-letter topic name is valid too.
pub fn validate_group(group: &str) -> Result<(), ErrorResponse> {
    validate_name("group", group)?;
    if is_reserved(group) || group.len() + DLQ_PREFIX.len() > MAX_NAME_LEN {
        return Err(ErrorResponse::new(
            ErrorCode::INVALID_ARGUMENT,
            format!(
                "group name {group:?} must not start with '%' and must be at most {} bytes",
                MAX_NAME_LEN - DLQ_PREFIX.len()
            ),
        ));
    }
    Ok(())
}

const DLQ_PREFIX: &str = "%DLQ%";

/// The dead-letter topic of a consumer group.
pub fn dead_letter_topic(group: &str) -> String {
    format!("{DLQ_PREFIX}{group}")
}

/// A message as a consumer receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Topic it was read from.
    pub topic: String,
    /// Where it is stored.
    pub position: Position,
    /// The message as published.
    pub message: Message,
    /// When the broker committed it (milliseconds since the Unix epoch).
    pub stored_at_ms: u64,
    /// How many times it has been delivered to this group, this one included.
    pub delivery_count: u32,
    /// Hand this back to ack, nack or extend.
    pub receipt: ReceiptHandle,
}

/// Checks a topic or group name: 1..=128 bytes of ASCII letters, digits, `.`, `_`, `-`.
///
/// Names starting with `%` are reserved for system topics (dead letters, abandoned transactions).
pub fn validate_name(kind: &str, name: &str) -> Result<(), ErrorResponse> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'%'));
    if ok {
        Ok(())
    } else {
        Err(ErrorResponse::new(
            ErrorCode::INVALID_ARGUMENT,
            format!(
                "{kind} name {name:?} must be 1..={MAX_NAME_LEN} bytes of ASCII letters, digits, '.', '_', '-' or '%'"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rejects_oversized_and_accepts_normal() {
        assert!(Message::new("a", vec![0; 10]).validate().is_ok());
        let big = Message::new("a", vec![0; MAX_BODY_LEN + 1]);
        assert_eq!(
            big.validate().unwrap_err().code,
            ErrorCode::MESSAGE_TOO_LARGE
        );
        assert_eq!(
            Message::new("", vec![]).validate().unwrap_err().code,
            ErrorCode::INVALID_ARGUMENT
        );
        let mut tags = Message::new("a", vec![]);
        tags.tags = vec!["t".into(); MAX_TAGS + 1];
        assert_eq!(
            tags.validate().unwrap_err().code,
            ErrorCode::MESSAGE_TOO_LARGE
        );
    }

    #[test]
    fn names() {
        assert!(validate_name("topic", "orders.v1_a-b").is_ok());
        assert!(validate_name("topic", "").is_err());
        assert!(
            validate_name("topic", "%DLQ%g").is_ok(),
            "reserved topics can be read"
        );
        assert!(validate_name("topic", "a b").is_err());
        assert!(validate_name("topic", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(validate_group("billing").is_ok());
        assert!(
            validate_group("%redriven%").is_err(),
            "reserved group names"
        );
        let longest = "g".repeat(MAX_NAME_LEN - DLQ_PREFIX.len());
        assert!(validate_group(&longest).is_ok());
        assert!(validate_name("topic", &dead_letter_topic(&longest)).is_ok());
        assert!(validate_group(&format!("{longest}g")).is_err());
    }
}
