//! Accept loop with a connection limit.

use crate::broker::Shared;
use crate::server::connection;
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut connections = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        next_id += 1;
                        connections.spawn(connection::run(incoming, shared.clone(), permit, next_id));
                    }
                    Err(_) => {
                        tracing::warn!(peer = %incoming.remote_address(), "connection limit reached; refusing");
                        incoming.refuse();
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}
