//! Raft RPCs over QUIC: ALPN `escrow-raft/1`, mutual TLS under the cluster CA.
//!
//! One RPC per bidirectional stream on a cached connection per peer, as on the client
//! side. The sending side consults the [`NetworkFilter`] so tests can drop or delay
//! traffic between chosen nodes.

use super::filter::{NetworkFilter, Verdict};
use super::{NodeAddr, Raft, TypeConfig};
use escrow_client::wire::{read_frame, write_frame};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
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

    async fn call(&mut self, rpc: RaftRpc, ttl: Duration) -> Result<RaftReply, PeerError> {
        match self.filter.check(self.me, self.target) {
            Verdict::Drop => return Err(self.error("dropped by the network filter")),
            Verdict::Pass(Some(delay)) => tokio::time::sleep(delay).await,
            Verdict::Pass(None) => {}
        }
        let exchange = async {
            let conn = self.connection().await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| self.error(e))?;
            write_frame(&mut send, &rpc, MAX_RAFT_FRAME)
                .await
                .map_err(|e| self.error(e))?;
            read_frame::<RaftReply>(&mut recv, MAX_RAFT_FRAME)
                .await
                .map_err(|e| self.error(e))
        };
        let result = match tokio::time::timeout(ttl, exchange).await {
            Ok(r) => r,
            Err(_) => Err(self.error("timed out")),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
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
            Err(e) => Err(unreachable(e)),
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
            Err(e) => Err(unreachable(e)),
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
            Err(e) => Err(unreachable(e)),
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
