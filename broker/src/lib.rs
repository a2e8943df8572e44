//! The Escrow broker node.
//!
//! A node listens for clients over QUIC (ALPN `escrow/1`), turns every state change
//! into a [`state::command::Command`], group-commits commands into Raft log entries
//! ([`proposer`]), and answers once the entry is committed on a majority and applied
//! by the deterministic [`state::StateMachine`] on redb. Consumer-group leases are
//! leader-local soft state ([`groups`]).
//!
//! ```no_run
//! use escrow_broker::{config::{BrokerConfig, TlsFiles}, tls, Broker};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let dir = std::path::PathBuf::from("/tmp/escrow-example");
//! let certs = tls::ensure_dev_tls(&dir, &[])?;
//! let mut config = BrokerConfig::new(
//!     "127.0.0.1:0".parse()?,
//!     "127.0.0.1:0".parse()?,
//!     dir,
//!     TlsFiles { cert: certs.node_cert, key: certs.node_key, ca: certs.ca_cert },
//! );
//! config.bootstrap = true; // a single-node cluster
//! let broker = Broker::start(config).await?;
//! println!("listening on {}", broker.local_addr());
//! broker.shutdown().await;
//! # Ok(()) }
//! ```

mod broker;
mod commands;
pub mod config;
pub mod groups;
pub mod metrics;
pub mod proposer;
pub mod raft;
pub mod redb_file;
mod server;
pub mod state;
pub mod storage;
pub mod tls;
mod txn;

pub use broker::{Broker, StartError};
