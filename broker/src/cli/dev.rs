use anyhow::Context;
use clap::Args;
use escrow_broker::config::{BrokerConfig, TlsFiles, DEFAULT_CLIENT_PORT, DEFAULT_RAFT_PORT};
use escrow_broker::{tls, Broker};
use escrow_client::defaults::default_dev_dir;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Data directory (default: $ESCROW_HOME/dev, i.e. ~/.escrow/dev).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client listen address (QUIC over UDP).
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLIENT_PORT)))]
    listen: SocketAddr,
    /// Raft listen address for peers (QUIC over UDP; port 0 picks a free one).
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_RAFT_PORT)))]
    raft_listen: SocketAddr,
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<()> {
    let default_dir = default_dev_dir();
    let data_dir = args.data_dir.clone().unwrap_or_else(|| default_dir.clone());
    let certs = tls::ensure_dev_tls(&data_dir, &[]).context("preparing dev TLS certificates")?;
    let mut config = BrokerConfig::new(
        args.listen,
        args.raft_listen,
        data_dir.clone(),
        TlsFiles {
            cert: certs.node_cert.clone(),
            key: certs.node_key.clone(),
            ca: certs.ca_cert.clone(),
        },
    );
    // A dev node is a one-voter Raft cluster of its own.
    config.bootstrap = true;
    let broker = Broker::start(config).await.context("starting the broker")?;
    let addr = broker.local_addr();
    // The banner is best effort: a closed stdout must not stop the broker.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "escrow dev: single node listening on {addr} (QUIC)");
    let _ = writeln!(out, "  data directory: {}", data_dir.display());
    let _ = writeln!(out, "  CA certificate: {}", certs.ca_cert.display());
    let _ = writeln!(out, "  node certificate sha256: {}", certs.fingerprint);
    let default_addr = SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLIENT_PORT));
    if data_dir != default_dir || addr != default_addr {
        let _ = writeln!(
            out,
            "  clients: export ESCROW_SERVER={addr} ESCROW_CA={}",
            certs.ca_cert.display()
        );
    }
    let _ = out.flush();
    drop(out);
    wait_for_signal().await;
    eprintln!("escrow dev: shutting down");
    broker.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
