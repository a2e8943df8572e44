use anyhow::Context;
use clap::Args;
use escrow_broker::config::BrokerConfig;
use escrow_broker::Broker;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Node configuration (TOML); `ESCROW_*` variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = BrokerConfig::load(args.config.as_deref())?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let node_id = config.node_id;
    let broker = Broker::start(config).await.context("starting the broker")?;
    println!(
        "escrow serve: node {node_id} listening on {} (clients), {} (raft)",
        broker.local_addr(),
        broker.raft_addr()
    );
    escrow_client::termination_signal().await;
    eprintln!("escrow serve: shutting down");
    broker.shutdown().await;
    Ok(())
}
