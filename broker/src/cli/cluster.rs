use super::ConnArgs;
use clap::Subcommand;
use escrow_client::{unexpected, Connection};
use escrow_proto::{ClusterRequest, ClusterStatus, Request, Response};

#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Make the --server node (uninitialized) a one-voter cluster.
    Init,
    /// Add a node as a learner: it replicates the log without voting.
    AddLearner {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// Its Raft address.
        #[arg(long)]
        raft_addr: String,
        /// Its client address.
        #[arg(long)]
        client_addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// Node id.
        #[arg(long)]
        id: u64,
    },
    /// Remove a node from the cluster.
    Remove {
        /// Node id.
        #[arg(long)]
        id: u64,
    },
    /// Every member's role, term, last log, committed and applied index.
    Status {
        /// One JSON object per node.
        #[arg(long)]
        json: bool,
    },
}

fn status_of(response: Response) -> anyhow::Result<ClusterStatus> {
    match response {
        Response::Cluster(s) => Ok(s),
        other => Err(unexpected("cluster", &other).into()),
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

pub(crate) async fn run(conn: &ConnArgs, command: ClusterCommand) -> anyhow::Result<()> {
    let request = match command {
        ClusterCommand::Init => ClusterRequest::Init,
        ClusterCommand::AddLearner {
            id,
            raft_addr,
            client_addr,
        } => ClusterRequest::AddLearner {
            node_id: id,
            raft_addr,
            client_addr,
        },
        ClusterCommand::Promote { id } => ClusterRequest::Promote { node_id: id },
        ClusterCommand::Remove { id } => ClusterRequest::Remove { node_id: id },
        ClusterCommand::Status { json } => return status(conn, json).await,
    };
    let client = conn.connect().await?;
    let s = status_of(client.request(&Request::Cluster(request)).await?)?;
    println!(
        "ok: node {} is {} in term {}; members: {}",
        s.node_id,
        s.role,
        s.term,
        s.members
            .iter()
            .map(|m| format!("{}{}", m.node_id, if m.voter { "" } else { "(learner)" }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn status(conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    let base = conn.client_config();
    // Ask the first seed that answers for the membership, then every member for itself.
    let mut known = None;
    let mut last_error = None;
    for seed in base.server.split(',').map(str::trim) {
        let mut config = base.clone();
        config.server = seed.to_string();
        match Connection::connect(&config).await {
            Ok(c) => match c.request(&Request::Cluster(ClusterRequest::Status)).await {
                Ok(r) => {
                    known = Some((status_of(r)?, seed.to_string()));
                    break;
                }
                Err(e) => last_error = Some(anyhow::Error::from(e)),
            },
            Err(e) => last_error = Some(e.into()),
        }
    }
    let Some((known, seed)) = known else {
        return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no server address given")));
    };
    if !json {
        println!("node\trole\tterm\tleader\tlast_log\tcommitted\tapplied\tsnapshot\tclient_addr");
    }
    let mut members = known.members.clone();
    if members.is_empty() {
        members.push(escrow_proto::Member {
            node_id: known.node_id,
            raft_addr: String::new(),
            client_addr: seed,
            voter: false,
        });
    }
    for member in members {
        let mut config = base.clone();
        config.server = member.client_addr.clone();
        let answer = match Connection::connect(&config).await {
            Ok(c) => c
                .request(&Request::Cluster(ClusterRequest::Status))
                .await
                .map_err(anyhow::Error::from)
                .and_then(status_of),
            Err(e) => Err(e.into()),
        };
        match (answer, json) {
            (Ok(s), true) => println!(
                "{}",
                serde_json::json!({
                    "node_id": s.node_id, "role": s.role, "term": s.term, "leader": s.leader,
                    "last_log": s.last_log, "committed": s.committed, "applied": s.applied,
                    "snapshot": s.snapshot, "purged": s.purged, "client_addr": member.client_addr,
                    "voter": member.voter,
                })
            ),
            (Ok(s), false) => println!(
                "{}\t{}{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                s.node_id,
                s.role,
                if member.voter { "" } else { " (learner)" },
                s.term,
                opt(s.leader),
                opt(s.last_log),
                opt(s.committed),
                opt(s.applied),
                opt(s.snapshot),
                member.client_addr
            ),
            (Err(e), true) => println!(
                "{}",
                serde_json::json!({"node_id": member.node_id, "client_addr": member.client_addr, "error": e.to_string()})
            ),
            (Err(e), false) => println!(
                "{}\tunreachable ({e})\t\t\t\t\t\t\t{}",
                member.node_id, member.client_addr
            ),
        }
    }
    Ok(())
}
