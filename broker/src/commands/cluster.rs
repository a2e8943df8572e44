use super::{invalid, Reply};
use crate::broker::Shared;
use crate::proposer::not_leader;
use crate::raft::{NodeAddr, ServerState};
use escrow_proto::{ClusterRequest, ClusterStatus, ErrorCode, ErrorResponse, Member, Response};
use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use std::collections::{BTreeMap, BTreeSet};

pub(super) async fn handle(shared: &Shared, request: ClusterRequest) -> Reply {
    let raft = &shared.raft;
    match request {
        ClusterRequest::Status => {}
        ClusterRequest::Init => {
            raft.initialize(BTreeMap::from([(shared.config.node_id, shared.me.clone())]))
                .await
                .map_err(|e| invalid(format!("cannot initialize: {e}")))?;
        }
        ClusterRequest::AddLearner {
            node_id,
            raft_addr,
            client_addr,
        } => {
            let node = NodeAddr {
                raft_addr,
                client_addr,
            };
            raft.add_learner(node_id, node, true)
                .await
                .map_err(write_error)?;
        }
        ClusterRequest::Promote { node_id } => {
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), false)
                .await
                .map_err(write_error)?;
        }
        ClusterRequest::Remove { node_id } => {
            let is_voter = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == node_id);
            let change = if is_voter {
                ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
            };
            raft.change_membership(change, false)
                .await
                .map_err(write_error)?;
        }
    }
    Ok(Response::Cluster(status(shared)))
}

fn write_error(e: RaftError<u64, ClientWriteError<u64, NodeAddr>>) -> ErrorResponse {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            not_leader(f.leader_node.as_ref())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            invalid(format!("membership change refused: {c}"))
        }
        RaftError::Fatal(f) => ErrorResponse::new(ErrorCode::SHUTTING_DOWN, f.to_string()),
    }
}

/// This node's status from its Raft metrics.
pub(crate) fn status(shared: &Shared) -> ClusterStatus {
    let m = shared.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| Member {
            node_id: *id,
            raft_addr: node.raft_addr.clone(),
            client_addr: node.client_addr.clone(),
            voter: voters.contains(id),
        })
        .collect();
    let role = match m.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    ClusterStatus {
        node_id: shared.config.node_id,
        role: role.into(),
        term: m.current_term,
        leader: m.current_leader,
        last_log: m.last_log_index,
        // The stored hint may trail; anything applied is committed.
        committed: shared
            .log
            .committed()
            .map(|l| l.index)
            .max(m.last_applied.map(|l| l.index)),
        applied: m.last_applied.map(|l| l.index),
        snapshot: m.snapshot.map(|l| l.index),
        purged: m.purged.map(|l| l.index),
        members,
    }
}
