use anyhow::Context;
use clap::Args;
use escrow_broker::config::{BrokerConfig, TlsFiles, DEFAULT_CLIENT_PORT, DEFAULT_RAFT_PORT};
use escrow_broker::raft::NodeAddr;
use escrow_broker::{tls, Broker};
use escrow_client::defaults::default_dev_dir;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Data directory (default: $ESCROW_HOME/dev, i.e. ~/.escrow/dev).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client listen address (QUIC over UDP); node i of --nodes listens on port + i - 1.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLIENT_PORT)))]
    listen: SocketAddr,
    /// Raft listen address for peers; port 0 picks free ports.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_RAFT_PORT)))]
    raft_listen: SocketAddr,
    /// Nodes to run in this one process (a local cluster for demos and tests).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
}

fn nth(addr: SocketAddr, i: u64) -> SocketAddr {
    let mut a = addr;
    if a.port() != 0 {
        a.set_port(a.port() + i as u16);
    }
    a
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<()> {
    let default_dir = default_dev_dir();
    let data_dir = args.data_dir.clone().unwrap_or_else(|| default_dir.clone());
    // One node keeps the historical layout; a cluster puts node i under n<i>/ with one shared CA.
    let certs = tls::ensure_dev_tls(&data_dir, &[]).context("preparing dev TLS certificates")?;
    let ca = tls::ensure_ca(&data_dir.join("tls"))?;
    let mut brokers = Vec::new();
    for i in 0..args.nodes {
        let (node_dir, cert, key) = if args.nodes == 1 {
            (
                data_dir.clone(),
                certs.node_cert.clone(),
                certs.node_key.clone(),
            )
        } else {
            let dir = data_dir.join(format!("n{}", i + 1));
            let (cert, key) = tls::ensure_node_cert(&ca, &dir.join("tls"), &[])?;
            (dir, cert, key)
        };
        let mut config = BrokerConfig::new(
            nth(args.listen, i),
            nth(args.raft_listen, i),
            node_dir,
            TlsFiles {
                cert,
                key,
                ca: ca.cert.clone(),
            },
        );
        config.node_id = i + 1;
        config.bootstrap = i == 0;
        brokers.push(
            Broker::start(config)
                .await
                .with_context(|| format!("starting node {}", i + 1))?,
        );
    }
    if args.nodes > 1 {
        join_cluster(&brokers).await?;
    }
    let addrs: Vec<String> = brokers.iter().map(|b| b.local_addr().to_string()).collect();
    // The banner is best effort: a closed stdout must not stop the broker.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "escrow dev: {} listening on {} (QUIC)",
        if args.nodes == 1 {
            "single node".to_string()
        } else {
            format!("{}-node cluster", args.nodes)
        },
        addrs.join(",")
    );
    let _ = writeln!(out, "  data directory: {}", data_dir.display());
    let _ = writeln!(out, "  CA certificate: {}", certs.ca_cert.display());
    let _ = writeln!(out, "  node certificate sha256: {}", certs.fingerprint);
    let default_addr = SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLIENT_PORT));
    if data_dir != default_dir || args.nodes > 1 || brokers[0].local_addr() != default_addr {
        let _ = writeln!(
            out,
            "  clients: export ESCROW_SERVER={} ESCROW_CA={}",
            addrs.join(","),
            certs.ca_cert.display()
        );
    }
    let _ = out.flush();
    drop(out);
    escrow_client::termination_signal().await;
    eprintln!("escrow dev: shutting down");
    for broker in brokers {
        broker.shutdown().await;
    }
    Ok(())
}

/// Makes every node a voter of node 1's cluster (idempotent across restarts).
async fn join_cluster(brokers: &[Broker]) -> anyhow::Result<()> {
    let leader = brokers[0].raft();
    let members = brokers[0].voters();
    let all: BTreeSet<u64> = brokers.iter().map(Broker::node_id).collect();
    if members == all {
        return Ok(());
    }
    leader
        .wait(Some(Duration::from_secs(30)))
        .current_leader(brokers[0].node_id(), "node 1 leads")
        .await
        .context("waiting for node 1 to lead")?;
    let others: Vec<_> = brokers[1..]
        .iter()
        .map(|b| {
            let node = NodeAddr {
                raft_addr: b.raft_addr().to_string(),
                client_addr: b.local_addr().to_string(),
            };
            (b.node_id(), node)
        })
        .collect();
    brokers[0].add_voters(&others).await?;
    Ok(())
}
