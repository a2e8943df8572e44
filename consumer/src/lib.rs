//! Escrow consumer: lease messages for a consumer group, ack them when done.
//!
//! Delivery is at-least-once: a message not acked within its invisibility time is
//! delivered again (with a higher `delivery_count`).
//!
//! ```no_run
//! use escrow_client::{ClientConfig, Trust};
//! use escrow_consumer::Consumer;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), escrow_client::ClientError> {
//! let client = ClientConfig::new("127.0.0.1:7440", Trust::CaFile("ca.pem".into()));
//! let consumer = Consumer::connect(&client, "billing", "orders").await?;
//! let batch = consumer.receive(32, Duration::from_secs(30), Duration::from_secs(5)).await?;
//! for delivery in &batch {
//!     println!("{}", String::from_utf8_lossy(&delivery.message.body));
//! }
//! let receipts: Vec<_> = batch.iter().map(|d| d.receipt).collect();
//! if !receipts.is_empty() {
//!     consumer.ack(&receipts).await?;
//! }
//! # Ok(()) }
//! ```

use escrow_client::{unexpected, Client, ClientConfig, ClientError};
use escrow_proto::{
    Ack, AckResult, ChangeInvisibility, Delivery, Nack, ReceiptHandle, Receive, Request, Response,
    MAX_WAIT_MS,
};
use std::time::Duration;

pub use escrow_client::ClientError as ConsumerError;

/// A consumer of one topic in one consumer group.
#[derive(Clone, Debug)]
pub struct Consumer {
    client: Client,
    group: String,
    topic: String,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Consumer {
    /// Connects to a broker as a member of `group` consuming `topic`.
    pub async fn connect(
        client: &ClientConfig,
        group: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<Consumer, ClientError> {
        Ok(Consumer::on(
            Client::connect(client.clone()).await?,
            group,
            topic,
        ))
    }

    /// A consumer sharing an existing client.
    pub fn on(client: Client, group: impl Into<String>, topic: impl Into<String>) -> Consumer {
        Consumer {
            client,
            group: group.into(),
            topic: topic.into(),
        }
    }

    /// Leases up to `max` messages, invisible to the rest of the group for `invisible_for`;
    /// waits up to `wait` (at most 30 s) when none is ready.
    pub async fn receive(
        &self,
        max: u32,
        invisible_for: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, ClientError> {
        let request = Request::Receive(Receive {
            topic: self.topic.clone(),
            group: self.group.clone(),
            max,
            invisible_for_ms: millis(invisible_for),
            wait_ms: millis(wait).min(MAX_WAIT_MS),
        });
        match self.client.request(&request).await? {
            Response::Messages(m) => Ok(m),
            other => Err(unexpected("receive", &other)),
        }
    }

    /// Acknowledges messages: done for this group, never delivered to it again.
    pub async fn ack(&self, receipts: &[ReceiptHandle]) -> Result<AckResult, ClientError> {
        let request = Request::Ack(Ack {
            topic: self.topic.clone(),
            group: self.group.clone(),
            receipts: receipts.to_vec(),
        });
        match self.client.request(&request).await? {
            Response::Acked(r) => Ok(r),
            other => Err(unexpected("ack", &other)),
        }
    }

    /// Gives messages back, visible again after `delay`.
    pub async fn nack(
        &self,
        receipts: &[ReceiptHandle],
        delay: Duration,
    ) -> Result<AckResult, ClientError> {
        self.nack_after(receipts, Some(millis(delay))).await
    }

    /// Gives messages back for a retry after the broker's backoff for their delivery
    /// count (RocketMQ's ladder by default: 10 s, 30 s, 1 m, 2 m, … 2 h).
    pub async fn nack_with_backoff(
        &self,
        receipts: &[ReceiptHandle],
    ) -> Result<AckResult, ClientError> {
        self.nack_after(receipts, None).await
    }

    async fn nack_after(
        &self,
        receipts: &[ReceiptHandle],
        delay_ms: Option<u64>,
    ) -> Result<AckResult, ClientError> {
        let request = Request::Nack(Nack {
            topic: self.topic.clone(),
            group: self.group.clone(),
            receipts: receipts.to_vec(),
            delay_ms,
        });
        match self.client.request(&request).await? {
            Response::Nacked(r) => Ok(r),
            other => Err(unexpected("nack", &other)),
        }
    }

    /// Extends (or shortens) a lease: invisible for `invisible_for` from now.
    pub async fn change_invisibility(
        &self,
        receipt: ReceiptHandle,
        invisible_for: Duration,
    ) -> Result<(), ClientError> {
        let request = Request::ChangeInvisibility(ChangeInvisibility {
            topic: self.topic.clone(),
            group: self.group.clone(),
            receipt,
            invisible_for_ms: millis(invisible_for),
        });
        match self.client.request(&request).await? {
            Response::InvisibilityChanged => Ok(()),
            other => Err(unexpected("change_invisibility", &other)),
        }
    }
}

pub mod push;
pub use push::{PushOptions, PushStats};
