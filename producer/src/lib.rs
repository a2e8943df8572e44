//! Escrow producer: publish one message, a batch, or many pipelined, durably.
//!
//! Every acknowledged send is durable (committed and fsynced, see
//! [`escrow_proto::Durability`]). Requests run on their own QUIC streams, so up to
//! `window` sends can be in flight at once.
//!
//! ```no_run
//! use escrow_client::{ClientConfig, Trust};
//! use escrow_producer::{Producer, ProducerConfig};
//! use escrow_proto::Message;
//!
//! # async fn run() -> Result<(), escrow_producer::ProducerError> {
//! let client = ClientConfig::new("127.0.0.1:7440", Trust::CaFile("ca.pem".into()));
//! let producer = Producer::connect(ProducerConfig::new(client)).await?;
//! let receipt = producer.send("orders", Message::new("", b"order 1".to_vec())).await?;
//! println!("stored at queue {} offset {}", receipt.position.queue, receipt.position.offset);
//!
//! // Pipelined: start many sends, then wait for their acks.
//! let mut pending = Vec::new();
//! for i in 0..1000 {
//!     let body = format!("order {i}").into_bytes();
//!     pending.push(producer.send_async("orders", Message::new("", body)).await?);
//! }
//! for p in pending {
//!     p.wait().await?;
//! }
//! # Ok(()) }
//! ```

use escrow_client::{unexpected, ClientConfig, ClientError, Connection};
use escrow_proto::{
    Durability, ErrorCode, ErrorResponse, Message, Position, ProducerSequence, Publish, Request,
    Response, MAX_BATCH_MESSAGES,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    /// The message or batch was refused before sending.
    #[error("invalid: {0}")]
    Invalid(ErrorResponse),
    /// The broker refused it, or the connection failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl ProducerError {
    /// The stable error code, when there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ProducerError::Invalid(e) => Some(e.code),
            ProducerError::Client(e) => e.code(),
        }
    }
}

/// Producer settings.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Where to connect.
    pub client: ClientConfig,
    /// Most publish requests in flight at once.
    pub window: usize,
}

impl ProducerConfig {
    /// Defaults: a window of 256.
    pub fn new(client: ClientConfig) -> ProducerConfig {
        ProducerConfig {
            client,
            window: 256,
        }
    }
}

/// Where one message went, and what made it durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendReceipt {
    /// Queue and offset.
    pub position: Position,
    /// Commit index and replicas.
    pub durability: Durability,
}

/// Where a batch went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchReceipt {
    /// One position per message, in order.
    pub positions: Vec<Position>,
    /// Commit index and replicas.
    pub durability: Durability,
}

/// A durable-publish client. Cheap to clone; clones share the connection and window.
#[derive(Clone, Debug)]
pub struct Producer {
    conn: Connection,
    window: Arc<Semaphore>,
    producer_id: u64,
    next_sequence: Arc<AtomicU64>,
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        // No OS randomness: fall back to the clock and pid, still unique enough per process.
        return escrow_client::now_ms() ^ (u64::from(std::process::id()) << 40);
    }
    u64::from_le_bytes(bytes)
}

impl Producer {
    /// Connects to a broker.
    pub async fn connect(config: ProducerConfig) -> Result<Producer, ProducerError> {
        let conn = Connection::connect(&config.client).await?;
        Ok(Producer {
            conn,
            window: Arc::new(Semaphore::new(config.window.max(1))),
            producer_id: random_u64(),
            next_sequence: Arc::new(AtomicU64::new(0)),
        })
    }

    /// This producer's id (carried by every publish for deduplication).
    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }

    /// Publishes one message and waits until it is durable.
    pub async fn send(&self, topic: &str, message: Message) -> Result<SendReceipt, ProducerError> {
        self.send_async(topic, message).await?.wait().await
    }

    /// Publishes a batch (stored in order) and waits until it is durable.
    pub async fn send_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<BatchReceipt, ProducerError> {
        let permit = self.window.clone().acquire_owned().await.map_err(|_| {
            ProducerError::Invalid(ErrorResponse::new(
                ErrorCode::SHUTTING_DOWN,
                "producer closed",
            ))
        })?;
        let request = self.prepare(topic, messages)?;
        publish(&self.conn, request, permit).await
    }

    /// Starts publishing one message once the window has room, without waiting for the ack.
    pub async fn send_async(
        &self,
        topic: &str,
        message: Message,
    ) -> Result<PendingSend, ProducerError> {
        let permit = self.window.clone().acquire_owned().await.map_err(|_| {
            ProducerError::Invalid(ErrorResponse::new(
                ErrorCode::SHUTTING_DOWN,
                "producer closed",
            ))
        })?;
        let request = self.prepare(topic, vec![message])?;
        let conn = self.conn.clone();
        let task = tokio::spawn(async move {
            let receipt = publish(&conn, request, permit).await?;
            Ok(SendReceipt {
                position: receipt.positions.first().copied().ok_or_else(|| {
                    ProducerError::Client(ClientError::UnexpectedResponse {
                        request: "publish",
                        response: "no position".into(),
                    })
                })?,
                durability: receipt.durability,
            })
        });
        Ok(PendingSend { task })
    }

    fn prepare(&self, topic: &str, mut messages: Vec<Message>) -> Result<Request, ProducerError> {
        if messages.is_empty() || messages.len() > MAX_BATCH_MESSAGES {
            return Err(ProducerError::Invalid(ErrorResponse::new(
                ErrorCode::BATCH_TOO_LARGE,
                format!("a batch holds 1..={MAX_BATCH_MESSAGES} messages"),
            )));
        }
        let first_sequence = self
            .next_sequence
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        let now = escrow_client::now_ms();
        for (i, message) in messages.iter_mut().enumerate() {
            if message.id.is_empty() {
                message.id = format!("{:016x}-{:016x}", self.producer_id, first_sequence + i as u64);
            }
            if message.born_at_ms == 0 {
                message.born_at_ms = now;
            }
            message.validate().map_err(ProducerError::Invalid)?;
        }
        Ok(Request::Publish(Publish {
            topic: topic.to_string(),
            producer: Some(ProducerSequence {
                producer_id: self.producer_id,
                first_sequence,
            }),
            messages,
        }))
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close();
    }
}

async fn publish(
    conn: &Connection,
    request: Request,
    _permit: OwnedSemaphorePermit,
) -> Result<BatchReceipt, ProducerError> {
    match conn.request(&request).await? {
        Response::Published(p) => Ok(BatchReceipt {
            positions: p.positions,
            durability: p.durability,
        }),
        other => Err(unexpected("publish", &other).into()),
    }
}

/// A send in flight; [`PendingSend::wait`] yields its receipt.
#[derive(Debug)]
pub struct PendingSend {
    task: tokio::task::JoinHandle<Result<SendReceipt, ProducerError>>,
}

impl PendingSend {
    /// Waits for the broker's durable acknowledgement.
    pub async fn wait(self) -> Result<SendReceipt, ProducerError> {
        self.task.await.unwrap_or_else(|e| {
            Err(ProducerError::Client(ClientError::Connection {
                addr: String::new(),
                reason: format!("send task failed: {e}"),
            }))
        })
    }
}
