//! One client connection: a handshake, then one request per bidirectional stream.

use crate::broker::Shared;
use crate::commands;
use escrow_client::wire::{read_body, read_header, write_frame, StreamError};
use escrow_proto::{frame, ErrorCode, ErrorResponse, Request, Response, MAX_FRAME_LEN};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Per-connection state.
#[derive(Debug, Default)]
pub(crate) struct Session {
    handshake_done: AtomicBool,
}

impl Session {
    pub(crate) fn ready(&self) -> bool {
        self.handshake_done.load(Ordering::Acquire)
    }

    pub(crate) fn mark_ready(&self) {
        self.handshake_done.store(true, Ordering::Release);
    }
}

struct ConnectionGauge(Arc<Shared>);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) async fn run(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
    conn_id: u64,
) {
    let peer = incoming.remote_address();
    let span = tracing::info_span!("conn", conn_id, %peer);
    async move {
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "handshake failed");
                return;
            }
        };
        shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let _gauge = ConnectionGauge(shared.clone());
        tracing::debug!("connected");
        let session = Arc::new(Session::default());
        let mut streams = JoinSet::new();
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    streams.spawn(handle_stream(shared.clone(), session.clone(), send, recv));
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "closed");
                    break;
                }
            }
            while streams.try_join_next().is_some() {}
        }
        streams.shutdown().await;
    }
    .instrument(span)
    .await
}

async fn handle_stream(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // Request bytes held at once are bounded node-wide: a frame's buffer is only
    // allocated once its length fits the budget (otherwise the stream waits).
    let read = async {
        let Some(len) = read_header(&mut recv, MAX_FRAME_LEN).await? else {
            return Ok(None);
        };
        let permits = u32::try_from(len).unwrap_or(u32::MAX).max(1);
        let budget = shared
            .in_flight_bytes
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| StreamError::Io("shutting down".into()))?;
        Ok(Some((read_body(&mut recv, len).await?, budget)))
    };
    let (response, checks) = match read.await {
        Ok(Some((payload, _budget))) => match frame::decode::<Request>(&payload) {
            Ok(request) => {
                let span = tracing::debug_span!("request", kind = request.kind());
                commands::dispatch(&shared, &session, request)
                    .instrument(span)
                    .await
            }
            Err(e) => {
                tracing::debug!(error = %e, "undecodable request");
                (Response::Error(e.into()), None)
            }
        },
        Ok(None) => (
            Response::Error(ErrorResponse::new(
                ErrorCode::MALFORMED,
                "stream ended before a request frame",
            )),
            None,
        ),
        Err(StreamError::Frame(e)) => {
            tracing::debug!(error = %e, "bad frame");
            // Tell the peer to stop sending the rest of an oversized or broken frame.
            let _ = recv.stop(0u32.into());
            (Response::Error(e.into()), None)
        }
        Err(StreamError::Io(e)) => {
            tracing::debug!(error = %e, "stream failed");
            return;
        }
    };
    let written = write_frame(&mut send, &response, MAX_FRAME_LEN).await;
    if let Err(e) = &written {
        tracing::debug!(error = %e, "could not send response");
    }
    if let Some(checks) = checks {
        // A check counts only once the producer's side acknowledged receiving it.
        let delivered = written.is_ok()
            && matches!(
                tokio::time::timeout(DELIVERY_TIMEOUT, send.stopped()).await,
                Ok(Ok(None))
            );
        commands::checks_delivered(&shared, checks, delivered).await;
    }
}

/// How long a response carrying check-backs may take to be acknowledged by the producer.
const DELIVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
