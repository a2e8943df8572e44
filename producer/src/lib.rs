//! Escrow producer: publish one message, a batch, or many pipelined, durably.
//!
//! Sends go to the cluster's leader and follow it through failovers; a retried batch
//! carries the same producer id and sequence, so the broker stores it once (G5).
//!
//! Every acknowledged send is durable (committed and fsynced on a majority, see
//! [`escrow_proto::Durability`]). Up to `window` sends may be unacknowledged at once;
//! sends that queue up while earlier requests are in flight travel together as one
//! batch (one request, one commit), as Kafka's record batches do with `linger.ms = 0`.
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

pub mod txn;

use escrow_client::{unexpected, Client, ClientConfig, ClientError};
use escrow_proto::{
    Durability, ErrorCode, ErrorResponse, Message, Position, ProducerSequence, Publish, Request,
    Response, MAX_BATCH_MESSAGES,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

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
    /// The batch this message travelled in failed (the same error for every message in it).
    #[error("batch failed: {message}")]
    Batch {
        /// The stable code, if the broker answered with one.
        code: Option<ErrorCode>,
        /// What went wrong.
        message: String,
    },
}

impl ProducerError {
    /// The stable error code, when there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ProducerError::Invalid(e) => Some(e.code),
            ProducerError::Client(e) => e.code(),
            ProducerError::Batch { code, .. } => *code,
        }
    }
}

/// Producer settings.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Where to connect.
    pub client: ClientConfig,
    /// Most sends unacknowledged at once (1 = each send waits for the previous ack).
    pub window: usize,
    /// Most publish requests in flight at once; sends queued meanwhile form the next batch.
    pub max_requests_in_flight: usize,
    /// Most messages in one batched request.
    pub max_batch_messages: usize,
    /// Most body bytes in one batched request.
    pub max_batch_bytes: usize,
    /// Ask the broker to store each message id once per topic within its dedup window.
    /// Set it when ids are stable across process restarts (outbox rows); producer
    /// sequences already cover retries within one producer's life.
    pub dedupe_by_id: bool,
}

impl ProducerConfig {
    /// Defaults: a window of 256 sends, 4 requests in flight, batches of up to 1024 messages or 1 MiB.
    pub fn new(client: ClientConfig) -> ProducerConfig {
        ProducerConfig {
            client,
            window: 256,
            max_requests_in_flight: 4,
            max_batch_messages: 1024,
            max_batch_bytes: 1024 * 1024,
            dedupe_by_id: false,
        }
    }
}

/// Where one message went, and what made it durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReceipt {
    /// The message id (the producer's default id when none was set).
    pub id: String,
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

/// A durable-publish client. Cheap to clone; clones share the connection, window and batcher.
#[derive(Clone, Debug)]
pub struct Producer {
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Queued>,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    window: Arc<Semaphore>,
    requests: Arc<Semaphore>,
    producer_id: u64,
    next_sequence: AtomicU64,
    max_batch_messages: usize,
    max_batch_bytes: usize,
    dedupe_by_id: bool,
}

/// A send waiting to be batched.
struct Queued {
    topic: String,
    message: Message,
    reply: oneshot::Sender<Result<SendReceipt, ProducerError>>,
    _window: OwnedSemaphorePermit,
}

pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        // No OS randomness: fall back to the clock and pid, still unique enough per process.
        return escrow_client::now_ms() ^ (u64::from(std::process::id()) << 40);
    }
    u64::from_le_bytes(bytes)
}

fn closed() -> ProducerError {
    ProducerError::Invalid(ErrorResponse::new(
        ErrorCode::SHUTTING_DOWN,
        "producer closed",
    ))
}

impl Producer {
    /// Connects to a broker.
    pub async fn connect(config: ProducerConfig) -> Result<Producer, ProducerError> {
        let client = Client::connect(config.client).await?;
        let shared = Arc::new(Shared {
            client,
            window: Arc::new(Semaphore::new(config.window.max(1))),
            requests: Arc::new(Semaphore::new(config.max_requests_in_flight.max(1))),
            producer_id: random_u64(),
            next_sequence: AtomicU64::new(0),
            max_batch_messages: config.max_batch_messages.clamp(1, MAX_BATCH_MESSAGES),
            max_batch_bytes: config.max_batch_bytes.max(1),
            dedupe_by_id: config.dedupe_by_id,
        });
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(batcher(shared.clone(), rx));
        Ok(Producer { shared, queue })
    }

    /// This producer's id (carried by every publish for deduplication).
    pub fn producer_id(&self) -> u64 {
        self.shared.producer_id
    }

    /// Publishes one message and waits until it is durable.
    pub async fn send(&self, topic: &str, message: Message) -> Result<SendReceipt, ProducerError> {
        self.send_async(topic, message).await?.wait().await
    }

    /// Queues one message once the window has room, without waiting for the ack.
    pub async fn send_async(
        &self,
        topic: &str,
        mut message: Message,
    ) -> Result<PendingSend, ProducerError> {
        let permit = self
            .shared
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        if message.born_at_ms == 0 {
            message.born_at_ms = escrow_client::now_ms();
        }
        if message.id.is_empty() {
            // Placeholder so validation sees a valid id; the batcher assigns the real one.
            message.id.push('-');
            message.validate().map_err(ProducerError::Invalid)?;
            message.id.clear();
        } else {
            message.validate().map_err(ProducerError::Invalid)?;
        }
        let (reply, rx) = oneshot::channel();
        self.queue
            .send(Queued {
                topic: topic.to_string(),
                message,
                reply,
                _window: permit,
            })
            .map_err(|_| closed())?;
        Ok(PendingSend { rx })
    }

    /// Publishes a batch as one request (stored in order) and waits until it is durable.
    pub async fn send_batch(
        &self,
        topic: &str,
        mut messages: Vec<Message>,
    ) -> Result<BatchReceipt, ProducerError> {
        if messages.is_empty() || messages.len() > MAX_BATCH_MESSAGES {
            return Err(ProducerError::Invalid(ErrorResponse::new(
                ErrorCode::BATCH_TOO_LARGE,
                format!("a batch holds 1..={MAX_BATCH_MESSAGES} messages"),
            )));
        }
        let now = escrow_client::now_ms();
        for m in &mut messages {
            if m.born_at_ms == 0 {
                m.born_at_ms = now;
            }
        }
        let _request = self.shared.requests.acquire().await.map_err(|_| closed())?;
        let request = self.shared.prepare(topic, messages)?;
        self.shared.publish(&request).await
    }

    /// Closes the connection; unsent messages fail.
    pub async fn close(&self) {
        self.shared.client.close().await;
    }
}

impl Shared {
    /// Assigns sequences (and default ids), validates, and builds the request.
    fn prepare(&self, topic: &str, mut messages: Vec<Message>) -> Result<Request, ProducerError> {
        let first_sequence = self
            .next_sequence
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        for (i, message) in messages.iter_mut().enumerate() {
            if message.id.is_empty() {
                message.id = format!(
                    "{:016x}-{:016x}",
                    self.producer_id,
                    first_sequence + i as u64
                );
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
            dedupe_by_id: self.dedupe_by_id,
        }))
    }

    async fn publish(&self, request: &Request) -> Result<BatchReceipt, ProducerError> {
        match self.client.request(request).await? {
            Response::Published(p) => Ok(BatchReceipt {
                positions: p.positions,
                durability: p.durability,
            }),
            other => Err(unexpected("publish", &other).into()),
        }
    }
}

/// Most yields [`settle`] makes before a batch is cut.
const MAX_SETTLE_YIELDS: usize = 16;

/// Lets the senders woken by the last answer queue before a batch is cut: yields until
/// the queue stops growing. Like Kafka's `linger.ms` without a timer, a lone sender pays
/// one yield, and a batch is not cut while its senders are still running on the other
/// worker threads.
pub(crate) async fn settle<T>(queue: &mpsc::UnboundedReceiver<T>) {
    let mut queued = queue.len();
    for _ in 0..MAX_SETTLE_YIELDS {
        tokio::task::yield_now().await;
        let now = queue.len();
        if now == queued {
            return;
        }
        queued = now;
    }
}

/// Forms batches from queued sends: whatever queued up while the request slots were busy.
async fn batcher(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let Ok(slot) = shared.requests.clone().acquire_owned().await else {
            return;
        };
        settle(&rx).await;
        let mut bytes = first.message.body.len();
        let topic = first.topic.clone();
        let mut batch = vec![first];
        while batch.len() < shared.max_batch_messages && bytes < shared.max_batch_bytes {
            match rx.try_recv() {
                Ok(q) if q.topic == topic => {
                    bytes += q.message.body.len();
                    batch.push(q);
                }
                Ok(q) => {
                    carry = Some(q);
                    break;
                }
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (messages, replies): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|q| (q.message, (q.reply, q._window)))
                .unzip();
            let result = match shared.prepare(&topic, messages) {
                Ok(request) => {
                    let ids: Vec<String> = match &request {
                        Request::Publish(p) => p.messages.iter().map(|m| m.id.clone()).collect(),
                        _ => Vec::new(),
                    };
                    shared.publish(&request).await.map(|r| (r, ids))
                }
                Err(e) => Err(e),
            };
            match result {
                Ok((receipt, ids)) => {
                    for (((reply, _permit), position), id) in
                        replies.into_iter().zip(receipt.positions).zip(ids)
                    {
                        let _ = reply.send(Ok(SendReceipt {
                            id,
                            position,
                            durability: receipt.durability,
                        }));
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    let code = e.code();
                    for (reply, _permit) in replies {
                        let _ = reply.send(Err(ProducerError::Batch {
                            code,
                            message: text.clone(),
                        }));
                    }
                }
            }
        });
    }
}

/// A send in flight; [`PendingSend::wait`] yields its receipt.
#[derive(Debug)]
pub struct PendingSend {
    rx: oneshot::Receiver<Result<SendReceipt, ProducerError>>,
}

impl PendingSend {
    /// Waits for the broker's durable acknowledgement.
    pub async fn wait(self) -> Result<SendReceipt, ProducerError> {
        self.rx.await.unwrap_or_else(|_| Err(closed()))
    }
}
