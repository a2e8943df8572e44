//! Starting and stopping a broker node.

use crate::commit::{self, CommitHandle, Published};
use crate::config::BrokerConfig;
use crate::groups::GroupLeases;
use crate::metrics::Metrics;
use crate::server::listener;
use crate::state::{GroupTopic, Index, StateMachine};
use crate::storage::{StorageError, Store};
use escrow_proto::ALPN_CLIENT;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Storage could not be opened.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// TLS material could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] escrow_client::ClientError),
    /// The listen address could not be bound, or a thread not spawned.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// State shared by every connection and request.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) store: Arc<Store>,
    pub(crate) view: Arc<RwLock<Index>>,
    pub(crate) commits: watch::Receiver<u64>,
    pub(crate) committer: CommitHandle,
    pub(crate) leases: Mutex<HashMap<GroupTopic, GroupLeases>>,
    pub(crate) round_robin: AtomicU32,
    pub(crate) metrics: Arc<Metrics>,
}

impl Shared {
    /// Reads the view; a poisoned lock still holds consistent data (writers replace whole entries).
    pub(crate) fn view(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<GroupTopic, GroupLeases>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running broker node.
#[derive(Debug)]
pub struct Broker {
    local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    shutdown: watch::Sender<bool>,
    accept_loop: tokio::task::JoinHandle<()>,
    commit_thread: std::thread::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Broker {
    /// Opens storage, starts the committer and listens for clients.
    pub async fn start(config: BrokerConfig) -> Result<Broker, StartError> {
        config.validate().map_err(StartError::Config)?;
        std::fs::create_dir_all(&config.data_dir)?;
        let store = Arc::new(Store::open(&config.data_dir.join("state.redb"))?);
        let machine = StateMachine::open(store.clone())?;
        let index = machine.index().clone();
        tracing::info!(
            topics = index.topics.len(),
            commit_index = index.commit_index,
            "state loaded"
        );
        let view = Arc::new(RwLock::new(index));
        let metrics = Arc::new(Metrics::default());
        let (commits_tx, commits) = watch::channel(0);
        let (committer, commit_thread) = commit::start(
            machine,
            Published {
                view: view.clone(),
                commits: commits_tx,
                metrics: metrics.clone(),
            },
        )?;

        let mut transport = escrow_client::transport_config();
        transport.max_concurrent_bidi_streams(config.max_streams_per_connection.into());
        let server_config =
            crate::tls::server_config(&config.tls.cert, &config.tls.key, ALPN_CLIENT, transport)?;
        let endpoint = quinn::Endpoint::server(server_config, config.listen)?;
        let local_addr = endpoint.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            store,
            view,
            commits,
            committer,
            leases: Mutex::new(HashMap::new()),
            round_robin: AtomicU32::new(0),
            metrics,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept_loop = tokio::spawn(listener::serve(
            endpoint.clone(),
            shared.clone(),
            shutdown_rx,
        ));
        tracing::info!(%local_addr, "listening");
        Ok(Broker {
            local_addr,
            endpoint,
            shutdown,
            accept_loop,
            commit_thread,
            shared,
        })
    }

    /// The bound client address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes connections, lets the committer finish and closes storage.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.endpoint.close(0u32.into(), b"shutting down");
        let _ = self.accept_loop.await;
        self.endpoint.wait_idle().await;
        // The last handle to the committer goes with `shared`; the thread then drains and exits.
        drop(self.shared);
        let thread = self.commit_thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}
