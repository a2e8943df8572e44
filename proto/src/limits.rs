//! Limits checked before anything is allocated or stored.

/// Largest frame (header excluded) either side accepts. Checked from the
/// length prefix before the payload buffer is allocated.
pub const MAX_FRAME_LEN: u32 = 8 * 1024 * 1024;
/// Largest message body.
pub const MAX_BODY_LEN: usize = 4 * 1024 * 1024;
/// Most messages in one publish request.
pub const MAX_BATCH_MESSAGES: usize = 4096;
/// Most messages one receive returns.
pub const MAX_RECEIVE_MESSAGES: u32 = 1024;
/// Longest topic or consumer-group name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest message id.
pub const MAX_ID_LEN: usize = 128;
/// Longest key or message group.
pub const MAX_KEY_LEN: usize = 512;
/// Most tags on a message.
pub const MAX_TAGS: usize = 32;
/// Most headers on a message.
pub const MAX_HEADERS: usize = 64;
/// Largest total size of a message's key, tags and headers.
pub const MAX_METADATA_LEN: usize = 32 * 1024;
/// Most queues in a topic.
pub const MAX_QUEUES: u32 = 1024;
/// Longest visibility timeout or nack delay (12 hours, as SQS).
pub const MAX_INVISIBLE_MS: u64 = 12 * 60 * 60 * 1000;
/// Longest long-poll wait of one receive.
pub const MAX_WAIT_MS: u64 = 30_000;
