//! `escrow-relay`: the outbox relay as a sidecar process for PostgreSQL.
//!
//! ```text
//! escrow-relay --database-url postgresql://app@db/app migrate
//! escrow-relay --database-url postgresql://app@db/app --server n1:7440,n2:7440 --ca ca.pem run
//! escrow-relay --database-url postgresql://app@db/app status
//! escrow-relay --database-url postgresql://app@db/app retry-parked
//! ```
//! Several relays may run against one table at once.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use escrow_client::{defaults, ClientConfig};
use escrow_outbox::core::RetryPolicy;
use escrow_outbox::pg::{PgConfig, PgOutbox};
use escrow_outbox::relay::{Relay, RelayConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "escrow-relay",
    version,
    about = "Publishes a PostgreSQL outbox table to Escrow"
)]
struct Cli {
    /// PostgreSQL connection string or URL.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgresql://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Outbox table (`name` or `schema.name`).
    #[arg(
        long,
        global = true,
        env = "ESCROW_OUTBOX_TABLE",
        default_value = "escrow_outbox"
    )]
    table: String,
    /// LISTEN/NOTIFY channel; defaults to the table name.
    #[arg(long, global = true)]
    channel: Option<String>,
    /// Message id prefix (`<prefix>-<row id>`); defaults to the table name.
    #[arg(long, global = true)]
    message_id_prefix: Option<String>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, global = true, env = "RUST_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish pending rows until interrupted.
    Run(RunArgs),
    /// Show backlog, lag, publish rate and parked rows.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create the outbox table and its indexes if missing.
    Migrate,
    /// Make parked rows pending again.
    RetryParked {
        /// Only these row ids (default: every parked row).
        #[arg(long = "id")]
        ids: Vec<u64>,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Broker address(es), comma-separated seeds. Defaults to where `escrow dev` listens.
    #[arg(long, env = "ESCROW_SERVER")]
    server: Option<String>,
    /// CA certificate (PEM) to trust. Defaults to `escrow dev`'s.
    #[arg(long, env = "ESCROW_CA")]
    ca: Option<PathBuf>,
    /// Trust exactly the server certificate with this SHA-256 fingerprint instead of a CA.
    #[arg(long, env = "ESCROW_FINGERPRINT", conflicts_with = "ca")]
    fingerprint: Option<String>,
    /// Rows claimed per batch.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Concurrent claim loops (one database connection each).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Polling interval when no NOTIFY arrives, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_interval_ms: u64,
    /// Refusals by the broker after which a row is parked.
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    /// First retry delay of a refused row, in milliseconds (doubles per attempt).
    #[arg(long, default_value_t = 500)]
    backoff_ms: u64,
    /// Longest retry delay, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    max_backoff_ms: u64,
    /// Keep sent rows this many seconds before the cleaner deletes them.
    #[arg(long, default_value_t = 600)]
    retention_secs: u64,
    /// Do not run the cleaner in this process.
    #[arg(long)]
    no_clean: bool,
    /// Create the table first if missing.
    #[arg(long)]
    migrate: bool,
}

fn outbox(cli: &Cli) -> anyhow::Result<PgOutbox> {
    let mut config = PgConfig::for_table(&cli.table);
    if let Some(c) = &cli.channel {
        config.channel = c.clone();
    }
    if let Some(p) = &cli.message_id_prefix {
        config.message_id_prefix = p.clone();
    }
    Ok(PgOutbox::new(cli.database_url.clone(), config)?)
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))?;
    tokio::spawn(connection);
    Ok(client)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = cli.log.clone().unwrap_or_else(|| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    let outbox = outbox(&cli)?;
    match &cli.command {
        Command::Migrate => {
            let client = connect(&cli.database_url).await?;
            outbox.migrate(&client).await?;
            println!("outbox table {} is ready", cli.table);
        }
        Command::Status { json } => {
            let client = connect(&cli.database_url).await?;
            let status = outbox.status(&client).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("table:            {}", cli.table);
                println!("backlog:          {} pending", status.pending);
                println!("lag:              {} ms", status.lag_ms);
                println!("sent last minute: {}", status.sent_last_minute);
                println!("sent (retained):  {}", status.sent_retained);
                println!("parked:           {}", status.parked);
                for p in &status.parked_rows {
                    println!(
                        "  parked row {} topic={} key={} attempts={} last_error={}",
                        p.id,
                        p.topic,
                        p.key.as_deref().unwrap_or("-"),
                        p.attempts,
                        p.last_error
                    );
                }
            }
        }
        Command::RetryParked { ids } => {
            let client = connect(&cli.database_url).await?;
            let ids = (!ids.is_empty()).then_some(ids.as_slice());
            let n = outbox.retry_parked(&client, ids).await?;
            println!("{n} parked rows are pending again");
        }
        Command::Run(args) => {
            if args.migrate {
                let client = connect(&cli.database_url).await?;
                outbox.migrate(&client).await?;
            }
            let server = args.server.clone().unwrap_or_else(defaults::default_server);
            let mut client = ClientConfig::new(
                server.clone(),
                defaults::trust(args.ca.as_deref(), args.fingerprint.as_deref()),
            );
            client.client_name = "escrow-relay".into();
            let config = RelayConfig {
                batch_size: args.batch_size,
                workers: args.workers,
                poll_interval: Duration::from_millis(args.poll_interval_ms.max(1)),
                retry: RetryPolicy {
                    max_attempts: args.max_attempts,
                    first_backoff: Duration::from_millis(args.backoff_ms),
                    max_backoff: Duration::from_millis(args.max_backoff_ms),
                },
                clean_interval: (!args.no_clean).then_some(Duration::from_secs(10)),
                retention: Duration::from_secs(args.retention_secs),
                ..RelayConfig::default()
            };
            let relay = Relay::connect(outbox, client, config)
                .await
                .with_context(|| format!("connecting to the broker at {server}"))?;
            eprintln!(
                "escrow-relay: relaying {} from {} to {server}",
                cli.table,
                redact(&cli.database_url)
            );
            relay.run(escrow_client::termination_signal()).await?;
        }
    }
    Ok(())
}
