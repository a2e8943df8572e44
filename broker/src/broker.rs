//! Starting and stopping a broker node.

use crate::config::BrokerConfig;
use crate::groups::GroupLeases;
use crate::metrics::Metrics;
use crate::proposer::{not_leader, Proposer};
use crate::raft::filter::NetworkFilter;
use crate::raft::log_store::LogStore;
use crate::raft::network::{self, NetworkFactory};
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{NodeAddr, Raft, ServerState};
use crate::server::listener;
use crate::state::command::Command;
use crate::state::{GroupTopic, Index, Published, StateMachine};
use crate::storage::{StorageError, Store};
use escrow_proto::{ErrorResponse, ALPN_CLIENT};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
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
    /// The Raft log could not be opened.
    #[error("raft log: {0}")]
    Log(#[from] redb::Error),
    /// Raft could not start.
    #[error("raft: {0}")]
    Raft(String),
    /// TLS material could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] escrow_client::ClientError),
    /// The listen address could not be bound.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// State shared by every connection and request.
pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    /// This node's advertised addresses.
    pub(crate) me: NodeAddr,
    pub(crate) store: Arc<Store>,
    pub(crate) view: Arc<RwLock<Index>>,
    pub(crate) commits: watch::Receiver<u64>,
    pub(crate) proposer: Proposer,
    pub(crate) raft: Raft,
    /// The Raft log (read for status reports).
    pub(crate) log: LogStore,
    pub(crate) leases: Mutex<HashMap<GroupTopic, GroupLeases>>,
    /// Raft term the leases were granted in; a new term discards them.
    pub(crate) lease_term: AtomicU64,
    /// The term of this node's vote and its last log index when it started. A node that
    /// led before a restart leads again at once in the same term, with its applied index
    /// wherever the committed hint left it: in that term it serves once it has applied
    /// that far. (A later term has its own first entry to wait for.)
    pub(crate) log_at_start: (u64, Option<u64>),
    pub(crate) round_robin: AtomicU32,
    /// Producer instances polling for transaction check-backs (leader-local).
    pub(crate) checks: crate::txn::CheckRegistry,
    pub(crate) metrics: Arc<Metrics>,
    /// Request bytes being read or handled, node-wide (`max_in_flight_bytes`).
    pub(crate) in_flight_bytes: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node_id", &self.config.node_id)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Reads the view; a poisoned lock still holds consistent data (writers replace whole entries).
    pub(crate) fn view(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<GroupTopic, GroupLeases>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ok when this node leads and has applied everything committed before its term
    /// (its own first entry), so its view is complete. Leases from an older term are dropped.
    pub(crate) fn require_leader(&self) -> Result<(), ErrorResponse> {
        // Read in place (this runs per request); the borrow ends before any lock is taken.
        let term = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            let me = self.config.node_id;
            if !serves_as_leader(&m, me, self.log_at_start) {
                let leader = m
                    .current_leader
                    .filter(|l| *l != me)
                    .and_then(|l| m.membership_config.membership().get_node(&l).cloned());
                return Err(not_leader(leader.as_ref()));
            }
            m.current_term
        };
        if self.lease_term.swap(term, Ordering::AcqRel) != term {
            self.leases().clear();
        }
        Ok(())
    }
}

/// Whether node `me` may answer leader-only requests: it leads, and it has applied an entry
/// of its current term (so everything committed before it). In the term it restarted in
/// (`log_at_start`: the vote's term and the last log index at start; openraft restarts a
/// former leader as leader in the same term) it must also have applied its whole log as
/// it was at start, since entries of that term may predate the restart.
fn serves_as_leader(m: &crate::raft::Metrics, me: u64, log_at_start: (u64, Option<u64>)) -> bool {
    let (start_term, start_index) = log_at_start;
    let caught_up = m.last_applied.is_some_and(|l| {
        l.leader_id.term == m.current_term
            && (m.current_term != start_term || Some(l.index) >= start_index)
    });
    m.state == ServerState::Leader && m.current_leader == Some(me) && caught_up
}

/// A running broker node.
pub struct Broker {
    local_addr: SocketAddr,
    raft_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    peer_endpoint: quinn::Endpoint,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
    /// Gone once the storage files are closed (after shutdown).
    log_closed: std::sync::Weak<redb::Database>,
    state_closed: std::sync::Weak<Store>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("node_id", &self.shared.config.node_id)
            .field("local_addr", &self.local_addr)
            .field("raft_addr", &self.raft_addr)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Opens storage, starts Raft and listens for peers and clients.
    pub async fn start(config: BrokerConfig) -> Result<Broker, StartError> {
        Broker::start_with_filter(config, Arc::new(NetworkFilter::default())).await
    }

    /// Like [`Broker::start`], with a fault-injection filter on outgoing Raft traffic (tests).
    pub async fn start_with_filter(
        config: BrokerConfig,
        filter: Arc<NetworkFilter>,
    ) -> Result<Broker, StartError> {
        config.validate().map_err(StartError::Config)?;
        std::fs::create_dir_all(&config.data_dir)?;
        let metrics = Arc::new(Metrics::default());
        let store = Arc::new(Store::open(&config.data_dir.join("state.redb"))?);
        let mut machine = StateMachine::open(store.clone())?;
        let published = Published::new(machine.index().clone(), metrics.clone());
        machine.publish_to(published.clone());
        tracing::info!(
            topics = machine.index().topics.len(),
            applied = machine.index().commit_index,
            "state loaded"
        );
        let sm = StateMachineStore::new(machine).map_err(|e| StartError::Raft(e.to_string()))?;
        let log = LogStore::open(&config.data_dir.join("raft-log.redb"), metrics.clone())?;
        store.attach_log(Arc::new(log.clone()));
        let log_at_start = log
            .vote_term_and_last_index()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let (peer_server, peer_client) =
            crate::tls::peer_configs(&config.tls.cert, &config.tls.key, &config.tls.ca)?;
        let mut peer_endpoint = escrow_client::endpoint(config.raft_listen, Some(peer_server))?;
        peer_endpoint.set_default_client_config(peer_client);
        let raft_addr = peer_endpoint.local_addr()?;

        let mut transport = escrow_client::transport_config();
        transport.max_concurrent_bidi_streams(config.max_streams_per_connection.into());
        let server_config =
            crate::tls::server_config(&config.tls.cert, &config.tls.key, ALPN_CLIENT, transport)?;
        let endpoint = escrow_client::endpoint(config.listen, Some(server_config))?;
        let local_addr = endpoint.local_addr()?;

        let raft_config = config.raft.config().map_err(StartError::Config)?;
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            NetworkFactory::new(config.node_id, peer_endpoint.clone(), filter),
            log.clone(),
            sm,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(network::serve(
            peer_endpoint.clone(),
            raft.clone(),
            shutdown_rx.clone(),
        ))];
        let me = NodeAddr {
            raft_addr: config
                .advertise_raft
                .clone()
                .unwrap_or_else(|| raft_addr.to_string()),
            client_addr: config
                .advertise_client
                .clone()
                .unwrap_or_else(|| local_addr.to_string()),
        };
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if config.bootstrap && !initialized {
            raft.initialize(BTreeMap::from([(config.node_id, me.clone())]))
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
        }

        let proposer = Proposer::start(raft.clone());
        let producer_expiry_ms = config.producer_idle_expiry_ms;
        tasks.push(tokio::spawn(housekeeping(
            raft.clone(),
            proposer.clone(),
            Duration::from_millis((producer_expiry_ms / 10).clamp(1000, 600_000)),
            move || Command::ExpireProducers {
                idle_before_ms: escrow_client::now_ms().saturating_sub(producer_expiry_ms),
            },
            shutdown_rx.clone(),
        )));
        let (dedupe_window_ms, dedupe_max_ids) = (config.dedupe_window_ms, config.dedupe_max_ids);
        tasks.push(tokio::spawn(housekeeping(
            raft.clone(),
            proposer.clone(),
            Duration::from_millis((dedupe_window_ms / 100).clamp(1000, 60_000)),
            move || Command::ExpireMessageIds {
                stored_before_ms: escrow_client::now_ms().saturating_sub(dedupe_window_ms),
                keep_at_most: dedupe_max_ids,
            },
            shutdown_rx.clone(),
        )));
        let log_closed = log.closed_watch();
        let state_closed = Arc::downgrade(&store);
        let in_flight_bytes = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight_bytes));
        let shared = Arc::new(Shared {
            config,
            me,
            store,
            view: published.view.clone(),
            commits: published.commits.subscribe(),
            proposer,
            raft,
            log,
            leases: Mutex::new(HashMap::new()),
            lease_term: AtomicU64::new(0),
            log_at_start,
            round_robin: AtomicU32::new(0),
            checks: crate::txn::CheckRegistry::default(),
            metrics,
            in_flight_bytes,
        });
        tasks.push(tokio::spawn(crate::txn::check_back_loop(
            shared.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(listener::serve(
            endpoint.clone(),
            shared.clone(),
            shutdown_rx,
        )));
        tracing::info!(%local_addr, %raft_addr, node_id = shared.config.node_id, "listening");
        Ok(Broker {
            local_addr,
            raft_addr,
            endpoint,
            peer_endpoint,
            shutdown,
            tasks,
            shared,
            log_closed,
            state_closed,
        })
    }

    /// The bound client address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound Raft address.
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.shared.config.node_id
    }

    /// The Raft handle (membership changes, metrics).
    pub fn raft(&self) -> &Raft {
        &self.shared.raft
    }

    /// Holds this node's Raft log writes while `stalled`, as a hung disk would (fault
    /// injection for tests).
    pub fn stall_log_writes(&self, stalled: bool) {
        self.shared.log.stall_writes(stalled);
    }

    /// The voters of the membership this node knows.
    pub fn voters(&self) -> std::collections::BTreeSet<u64> {
        self.shared
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// On the leader: adds `nodes` as learners (each waits until it caught up), then makes
    /// them voters alongside the current voters.
    pub async fn add_voters(&self, nodes: &[(u64, NodeAddr)]) -> Result<(), StartError> {
        let raft = &self.shared.raft;
        let raft_error = |e: &dyn std::fmt::Display| StartError::Raft(e.to_string());
        for (id, addr) in nodes {
            raft.add_learner(*id, addr.clone(), true)
                .await
                .map_err(|e| raft_error(&e))?;
        }
        let ids = nodes.iter().map(|(id, _)| *id).collect();
        raft.change_membership(openraft::ChangeMembers::AddVoterIds(ids), false)
            .await
            .map_err(|e| raft_error(&e))?;
        Ok(())
    }

    /// Stops Raft and the listeners, and closes storage.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.shared.raft.shutdown().await;
        self.endpoint.close(0u32.into(), b"shutting down");
        self.peer_endpoint.close(0u32.into(), b"shutting down");
        for task in self.tasks {
            let _ = task.await;
        }
        self.endpoint.wait_idle().await;
        drop(self.shared);
        Self::wait_closed(&self.log_closed, &self.state_closed).await;
    }

    /// Stops the way a crash would, for tests: no answer to requests in flight, no
    /// goodbye to clients or peers (they notice by timeouts); storage keeps only what
    /// was fsynced. The data directory can be opened again afterwards.
    pub async fn crash(self) {
        for task in &self.tasks {
            task.abort();
        }
        // Stops the Raft core without telling peers anything.
        let _ = self.shared.raft.shutdown().await;
        let Broker {
            endpoint,
            peer_endpoint,
            shared,
            log_closed,
            state_closed,
            tasks,
            ..
        } = self;
        for task in tasks {
            let _ = task.await;
        }
        drop((endpoint, peer_endpoint, shared));
        Self::wait_closed(&log_closed, &state_closed).await;
    }

    /// Raft's background tasks let go of the stores shortly after shutdown; wait for
    /// the files to close so the same data directory can be opened again at once.
    async fn wait_closed(
        log_closed: &std::sync::Weak<redb::Database>,
        state_closed: &std::sync::Weak<Store>,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while (log_closed.strong_count() > 0 || state_closed.strong_count() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// On the leader, proposes `command()` every `period` (expiry of replicated bookkeeping).
async fn housekeeping(
    raft: Raft,
    proposer: Proposer,
    period: Duration,
    command: impl Fn() -> Command,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        if raft.metrics().borrow().state != ServerState::Leader {
            continue;
        }
        if let Err(e) = proposer.propose(command()).await {
            tracing::debug!(error = %e, "housekeeping command not applied");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader_metrics(term: u64, applied: Option<(u64, u64)>) -> crate::raft::Metrics {
        let mut m = openraft::RaftMetrics::new_initial(1);
        m.state = ServerState::Leader;
        m.current_leader = Some(1);
        m.current_term = term;
        m.last_applied = applied
            .map(|(t, index)| openraft::LogId::new(openraft::CommittedLeaderId::new(t, 1), index));
        m
    }

    #[test]
    fn a_leader_restarted_in_its_term_serves_only_once_its_log_at_start_is_applied() {
        // Restarted in term 5 with entries up to 100, all of term 5.
        let at_start = (5, Some(100));
        assert!(!serves_as_leader(
            &leader_metrics(5, Some((5, 90))),
            1,
            at_start
        ));
        assert!(serves_as_leader(
            &leader_metrics(5, Some((5, 100))),
            1,
            at_start
        ));
        // Elected in a later term: its own first entry of that term is the mark.
        assert!(!serves_as_leader(
            &leader_metrics(6, Some((5, 100))),
            1,
            at_start
        ));
        assert!(serves_as_leader(
            &leader_metrics(6, Some((6, 101))),
            1,
            at_start
        ));
        assert!(!serves_as_leader(&leader_metrics(6, None), 1, at_start));
    }

    #[test]
    fn only_the_current_leader_serves() {
        let mut follower = leader_metrics(6, Some((6, 101)));
        follower.state = ServerState::Follower;
        follower.current_leader = Some(2);
        assert!(!serves_as_leader(&follower, 1, (5, Some(100))));
        let mut stale = leader_metrics(6, Some((6, 101)));
        stale.current_leader = Some(2);
        assert!(!serves_as_leader(&stale, 1, (5, Some(100))));
    }
}
