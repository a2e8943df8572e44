//! Raft RPCs over QUIC: ALPN `escrow-raft/1`, mutual TLS under the cluster CA.
//!
//! One RPC per bidirectional stream on a cached connection per peer, as on the client
//! side. The sending side consults the [`NetworkFilter`] so tests can drop or delay
//! traffic between chosen nodes.

use super::filter::{NetworkFilter, Verdict};
use super::{NodeAddr, Raft, TypeConfig};
use escrow_client::wire::{read_frame, write_frame};
use openraft::error::{
    InstallSnapshotError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Largest Raft frame: AppendEntries carry up to `max_payload_entries` batches.
pub const MAX_RAFT_FRAME: u32 = 256 * 1024 * 1024;
/// Server name every node certificate carries for peer connections.
pub const PEER_SERVER_NAME: &str = "escrow-node";

/// A Raft request on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// AppendEntries (also heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// RequestVote.
    Vote(VoteRequest<u64>),
    /// One chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// A Raft reply on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To `Append`.
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
}

/// Creates peer clients sharing one QUIC endpoint.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    me: u64,
    endpoint: quinn::Endpoint,
    filter: Arc<NetworkFilter>,
}

impl NetworkFactory {
    /// A factory sending from node `me` through `endpoint` (configured with the peer client TLS).
    pub fn new(me: u64, endpoint: quinn::Endpoint, filter: Arc<NetworkFilter>) -> NetworkFactory {
        NetworkFactory {
            me,
            endpoint,
            filter,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> PeerClient {
        PeerClient {
            me: self.me,
            target,
            addr: node.raft_addr.clone(),
            endpoint: self.endpoint.clone(),
            filter: self.filter.clone(),
            conn: None,
        }
    }
}

/// The connection to one peer.
#[derive(Debug)]
pub struct PeerClient {
    me: u64,
    target: u64,
    addr: String,
    endpoint: quinn::Endpoint,
    filter: Arc<NetworkFilter>,
    conn: Option<quinn::Connection>,
}

#[derive(Debug, thiserror::Error)]
#[error("peer {target} at {addr}: {reason}")]
struct PeerError {
    target: u64,
    addr: String,
    reason: String,
}

/// Why an RPC got no reply.
#[derive(Debug)]
enum CallError {
    /// No connection, or it failed: openraft backs off before the next try.
    Unreachable(PeerError),
    /// The request went out on a live connection and the reply did not come in time (a
    /// follower's slow fsync, say): openraft tries again at once, without a back-off.
    TimedOut(Duration),
}

impl PeerClient {
    fn error(&self, reason: impl std::fmt::Display) -> PeerError {
        PeerError {
            target: self.target,
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    async fn connection(&mut self) -> Result<quinn::Connection, PeerError> {
        if let Some(conn) = &self.conn {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let addr: SocketAddr = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| self.error(e))?
            .next()
            .ok_or_else(|| self.error("address resolved to nothing"))?;
        let conn = self
            .endpoint
            .connect(addr, PEER_SERVER_NAME)
            .map_err(|e| self.error(e))?
            .await
            .map_err(|e| self.error(e))?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    async fn call(&mut self, rpc: RaftRpc, ttl: Duration) -> Result<RaftReply, CallError> {
        match self.filter.check(self.me, self.target) {
            Verdict::Drop => {
                return Err(CallError::Unreachable(
                    self.error("dropped by the network filter"),
                ))
            }
            Verdict::Pass(Some(delay)) => tokio::time::sleep(delay).await,
            Verdict::Pass(None) => {}
        }
        let deadline = tokio::time::Instant::now() + ttl;
        let conn = match tokio::time::timeout_at(deadline, self.connection()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(self.drop_connection(e)),
            Err(_) => {
                let e = self.error("timed out connecting");
                return Err(self.drop_connection(e));
            }
        };
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| self.error(e))?;
            write_frame(&mut send, &rpc, MAX_RAFT_FRAME)
                .await
                .map_err(|e| self.error(e))?;
            read_frame::<RaftReply>(&mut recv, MAX_RAFT_FRAME)
                .await
                .map_err(|e| self.error(e))
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(self.drop_connection(e)),
            // The connection stays: a slow reply says nothing against it.
            Err(_) => Err(CallError::TimedOut(ttl)),
        }
    }

    fn drop_connection(&mut self, e: PeerError) -> CallError {
        self.conn = None;
        CallError::Unreachable(e)
    }

    /// The openraft error for a call that got no reply.
    fn rpc_error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        e: CallError,
    ) -> RPCError<u64, NodeAddr, E> {
        match e {
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::TimedOut(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.me,
                target: self.target,
                timeout,
            }),
        }
    }
}

fn unreachable<E: std::error::Error>(e: PeerError) -> RPCError<u64, NodeAddr, E> {
    RPCError::Unreachable(Unreachable::new(&e))
}

fn wrong_reply<E: std::error::Error>(target: u64) -> RPCError<u64, NodeAddr, E> {
    unreachable(PeerError {
        target,
        addr: String::new(),
        reason: "reply of the wrong kind".into(),
    })
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        match self.call(RaftRpc::Append(rpc), option.hard_ttl()).await {
            Ok(RaftReply::Append(Ok(r))) => Ok(r),
            Ok(RaftReply::Append(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(wrong_reply(self.target)),
            Err(e) => Err(self.rpc_error(RPCTypes::AppendEntries, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, NodeAddr, RaftError<u64, InstallSnapshotError>>,
    > {
        match self.call(RaftRpc::Snapshot(rpc), option.hard_ttl()).await {
            Ok(RaftReply::Snapshot(Ok(r))) => Ok(r),
            Ok(RaftReply::Snapshot(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(wrong_reply(self.target)),
            Err(e) => Err(self.rpc_error(RPCTypes::InstallSnapshot, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        match self.call(RaftRpc::Vote(rpc), option.hard_ttl()).await {
            Ok(RaftReply::Vote(Ok(r))) => Ok(r),
            Ok(RaftReply::Vote(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(wrong_reply(self.target)),
            Err(e) => Err(self.rpc_error(RPCTypes::Vote, e)),
        }
    }
}

/// Serves Raft RPCs from peers until `shutdown` changes.
pub async fn serve(endpoint: quinn::Endpoint, raft: Raft, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                connections.spawn(serve_connection(incoming, raft.clone()));
            }
            _ = shutdown.changed() => break,
        }
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

async fn serve_connection(incoming: quinn::Incoming, raft: Raft) {
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(error = %e, "peer handshake failed");
            return;
        }
    };
    let mut streams = JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let raft = raft.clone();
        streams.spawn(async move {
            let rpc = match read_frame::<RaftRpc>(&mut recv, MAX_RAFT_FRAME).await {
                Ok(rpc) => rpc,
                Err(e) => {
                    tracing::warn!(error = %e, "bad raft frame from a peer");
                    return;
                }
            };
            let reply = match rpc {
                RaftRpc::Append(r) => RaftReply::Append(raft.append_entries(r).await),
                RaftRpc::Vote(r) => RaftReply::Vote(raft.vote(r).await),
                RaftRpc::Snapshot(r) => RaftReply::Snapshot(raft.install_snapshot(r).await),
            };
            if let Err(e) = write_frame(&mut send, &reply, MAX_RAFT_FRAME).await {
                tracing::debug!(error = %e, "could not answer a peer");
            }
        });
        while streams.try_join_next().is_some() {}
    }
    streams.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: vec![],
        }
    }

    /// A follower whose log write hangs answers nothing on a live connection: that is a
    /// timeout, retried at once. Only a peer that cannot be reached makes openraft back off
    /// (500 ms): a slow fsync on both followers used to stall a leader for that long.
    #[tokio::test]
    async fn an_unanswered_request_times_out_and_an_absent_peer_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let tls = crate::tls::ensure_dev_tls(dir.path(), &[]).unwrap();
        let (server, client) =
            crate::tls::peer_configs(&tls.node_cert, &tls.node_key, &tls.ca_cert).unwrap();
        let silent = escrow_client::endpoint("127.0.0.1:0".parse().unwrap(), Some(server)).unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Some(incoming) = silent.accept().await {
                let Ok(conn) = incoming.await else { continue };
                while let Ok(stream) = conn.accept_bi().await {
                    open.push(stream);
                }
            }
        });
        let mut endpoint = escrow_client::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        endpoint.set_default_client_config(client);
        let mut factory = NetworkFactory::new(1, endpoint, Arc::default());
        let ttl = RPCOption::new(Duration::from_millis(300));

        let node = |addr: SocketAddr| NodeAddr {
            raft_addr: addr.to_string(),
            client_addr: String::new(),
        };
        let mut slow = factory.new_client(2, &node(silent_addr)).await;
        let err = slow
            .append_entries(heartbeat(), ttl.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, RPCError::Timeout(_)), "{err:?}");

        let absent = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut gone = factory.new_client(3, &node(absent)).await;
        let err = gone.append_entries(heartbeat(), ttl).await.unwrap_err();
        assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
        hold.abort();
    }
}
