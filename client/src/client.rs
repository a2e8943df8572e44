//! A client of a cluster: follows the leader and fails over with bounded retries.

use crate::{ClientConfig, ClientError, Connection};
use escrow_proto::{ErrorCode, Request, Response};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A cluster client. Cheap to clone; clones share the connection.
///
/// `request` sends to the node it believes leads; on `NOT_LEADER` it follows the
/// redirect, on a broken connection it tries the next seed address, backing off,
/// until `failover_timeout` has passed. Retried publishes are safe: they carry the
/// producer's id and sequence, and the broker stores a retry once.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    seeds: Vec<String>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    conn: Option<Connection>,
    target: String,
    next_seed: usize,
}

fn seeds_of(server: &str) -> Vec<String> {
    server
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Client {
    /// Connects to the first reachable seed in `config.server` (comma-separated addresses).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let seeds = seeds_of(&config.server);
        let first = seeds
            .first()
            .cloned()
            .ok_or_else(|| ClientError::Connection {
                addr: config.server.clone(),
                reason: "no server address given".into(),
            })?;
        let client = Client {
            inner: Arc::new(Inner {
                config,
                seeds,
                state: Mutex::new(State {
                    conn: None,
                    target: first,
                    next_seed: 1,
                }),
            }),
        };
        client.request(&Request::ListTopics).await.map(|_| client)
    }

    /// The address requests currently go to.
    pub async fn target(&self) -> String {
        self.inner.state.lock().await.target.clone()
    }

    /// The connection to the current target, and that target.
    async fn connection(&self) -> (Result<Connection, ClientError>, String) {
        let mut state = self.inner.state.lock().await;
        let target = state.target.clone();
        if let Some(conn) = &state.conn {
            if conn.quic().close_reason().is_none() {
                return (Ok(conn.clone()), target);
            }
        }
        let mut config = self.inner.config.clone();
        config.server = target.clone();
        let result = Connection::connect(&config).await;
        if let Ok(conn) = &result {
            state.conn = Some(conn.clone());
        }
        (result, target)
    }

    // Both moves apply only if `failed` is still the target: when concurrent requests fail
    // on the same node, the first one moves on and the others must not move again.

    async fn redirect(&self, failed: &str, leader: Option<String>) {
        let mut state = self.inner.state.lock().await;
        if state.target != failed {
            return;
        }
        state.conn = None;
        if let Some(leader) = leader {
            state.target = leader;
        }
    }

    async fn next_seed(&self, failed: &str) {
        let mut state = self.inner.state.lock().await;
        if state.target != failed {
            return;
        }
        state.conn = None;
        if !self.inner.seeds.is_empty() {
            let i = state.next_seed % self.inner.seeds.len();
            state.target = self.inner.seeds[i].clone();
            state.next_seed = i + 1;
        }
    }

    /// Sends a request to the leader, following redirects and failing over.
    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.inner.config.failover_timeout;
        let mut attempt: u32 = 0;
        loop {
            let (conn, target) = self.connection().await;
            let result = match conn {
                Ok(conn) => conn.request(request).await,
                Err(e) => Err(e),
            };
            let error = match result {
                Err(ClientError::Server(e)) if e.code == ErrorCode::NOT_LEADER => {
                    let known = e.leader.is_some();
                    self.redirect(&target, e.leader.clone()).await;
                    if known && attempt == 0 {
                        attempt += 1;
                        continue; // follow a known leader at once
                    }
                    ClientError::Server(e)
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::SHUTTING_DOWN => {
                    self.next_seed(&target).await;
                    ClientError::Server(e)
                }
                Err(e @ (ClientError::Connection { .. } | ClientError::Timeout(_))) => {
                    self.next_seed(&target).await;
                    e
                }
                other => return other,
            };
            attempt += 1;
            let backoff =
                Duration::from_millis(25u64 << attempt.min(5)).min(Duration::from_millis(500));
            if Instant::now() + backoff > deadline {
                return Err(error);
            }
            tracing::debug!(%error, attempt, "retrying on another node");
            tokio::time::sleep(backoff).await;
        }
    }

    /// Closes the current connection.
    pub async fn close(&self) {
        if let Some(conn) = self.inner.state.lock().await.conn.take() {
            conn.close();
        }
    }
}
