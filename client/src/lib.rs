//! Client plumbing shared by `escrow-producer`, `escrow-consumer` and the `escrow` CLI:
//! the QUIC endpoint, TLS trust (CA file or pinned fingerprint), the version handshake
//! and one-request-per-stream exchanges.
//!
//! ```no_run
//! use escrow_client::{ClientConfig, Connection, Trust};
//! use escrow_proto::{Request, Response};
//!
//! # async fn run() -> Result<(), escrow_client::ClientError> {
//! let config = ClientConfig::new("127.0.0.1:7440", Trust::CaFile("ca.pem".into()));
//! let conn = Connection::connect(&config).await?;
//! if let Response::Topics(topics) = conn.request(&Request::ListTopics).await? {
//!     println!("{} topics", topics.len());
//! }
//! # Ok(()) }
//! ```

mod client;
mod connection;
pub mod defaults;
mod error;
pub mod tls;
pub mod wire;

pub use client::Client;
pub use connection::{
    endpoint, mtu_discovery, transport_config, unexpected, ClientConfig, Connection,
    MAX_UDP_PAYLOAD,
};
pub use error::ClientError;
pub use tls::Trust;

/// Milliseconds since the Unix epoch, by the local clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Completes on Ctrl-C or, on Unix, SIGTERM: when a server or sidecar should stop.
pub async fn termination_signal() {
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
