//! Command-line interface of the `escrow` binary.

mod cert;
mod cluster;
mod dev;
mod group;
mod receive;
mod send;
mod serve;
mod topic;
mod txn;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use escrow_client::{defaults, Client, ClientConfig};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "escrow",
    version,
    about = "Escrow: a transactional message queue"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Log filter (RUST_LOG syntax), e.g. `info` or `escrow_broker=debug`.
    #[arg(long, global = true, env = "RUST_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// How client commands reach a broker.
#[derive(Debug, Args)]
struct ConnArgs {
    /// Broker address (host:port, or several comma-separated). Defaults to where `escrow dev` listens.
    #[arg(long, global = true, env = "ESCROW_SERVER")]
    server: Option<String>,
    /// CA certificate (PEM) to trust. Defaults to the one `escrow dev` keeps in its default data directory.
    #[arg(long, global = true, env = "ESCROW_CA")]
    ca: Option<PathBuf>,
    /// Trust exactly the server certificate with this SHA-256 fingerprint instead of a CA.
    #[arg(long, global = true, env = "ESCROW_FINGERPRINT", conflicts_with = "ca")]
    fingerprint: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local broker with zero setup: one node, or `--nodes 3` in one process.
    Dev(dev::DevArgs),
    /// Run a cluster node from a configuration file (`--print-config` shows the effective one).
    Serve(serve::ServeArgs),
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Make a cluster CA and node certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Create, list and describe topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Publish messages: BODY, or one message per line of standard input.
    Send(send::SendArgs),
    /// Receive messages for a consumer group and print their bodies.
    Receive(receive::ReceiveArgs),
    /// Consumer groups: list, lag.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Dead letters: list, redrive.
    #[command(subcommand)]
    Dlq(group::DlqCommand),
    /// Transactions: list pending half messages, commit or roll one back.
    #[command(subcommand)]
    Txn(txn::TxnCommand),
    /// Print the broker's counters (fsyncs, messages, connections) as JSON.
    Stats,
}

impl ConnArgs {
    fn client_config(&self) -> ClientConfig {
        let server = self.server.clone().unwrap_or_else(defaults::default_server);
        let trust = defaults::trust(self.ca.as_deref(), self.fingerprint.as_deref());
        let mut config = ClientConfig::new(server, trust);
        config.client_name = "escrow-cli".into();
        config
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        let config = self.client_config();
        let server = config.server.clone();
        Client::connect(config)
            .await
            .with_context(|| format!("connecting to {server}"))
    }
}

pub(crate) fn init_tracing(cli: &Cli) {
    let default = match cli.command {
        // openraft warns about benign races (stale replies after a membership change).
        Command::Dev(_) | Command::Serve(_) => "info,openraft=error",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Cluster(cmd) => cluster::run(&cli.conn, cmd).await,
        Command::Cert(cmd) => cert::run(cmd),
        Command::Topic(cmd) => topic::run(&cli.conn, cmd).await,
        Command::Send(args) => send::run(&cli.conn, args).await,
        Command::Receive(args) => receive::run(&cli.conn, args).await,
        Command::Group(cmd) => group::run_group(&cli.conn, cmd).await,
        Command::Dlq(cmd) => group::run_dlq(&cli.conn, cmd).await,
        Command::Txn(cmd) => txn::run(&cli.conn, cmd).await,
        Command::Stats => {
            let conn = cli.conn.connect().await?;
            match conn.request(&escrow_proto::Request::Stats).await? {
                escrow_proto::Response::Stats(s) => {
                    println!(
                        "{}",
                        serde_json::json!({
                            "fsyncs": s.fsyncs,
                            "commands_applied": s.commands_applied,
                            "messages_appended": s.messages_appended,
                            "bytes_appended": s.bytes_appended,
                            "connections": s.connections,
                        })
                    );
                    Ok(())
                }
                other => Err(escrow_client::unexpected("stats", &other).into()),
            }
        }
    }
}
