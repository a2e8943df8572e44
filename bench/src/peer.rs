//! What the peer comparisons share (`--features nats`, `--features rabbitmq`): publishing
//! with at most a window of messages unacknowledged, and the report.

use crate::report::{histogram, Report, Totals};
use crate::scenarios::Load;
use hdrhistogram::Histogram;
use std::future::Future;
use std::time::Instant;
use tokio::task::JoinSet;

/// Acknowledgements in flight, their latencies and failures.
pub(crate) struct Acks {
    window: usize,
    pending: JoinSet<Result<u64, String>>,
    latency: Histogram<u64>,
    errors: u64,
    started: Instant,
}

impl Acks {
    /// Starts the clock for a run that keeps at most `window` messages unacknowledged.
    pub(crate) fn new(window: usize) -> Acks {
        Acks {
            window: window.max(1),
            pending: JoinSet::new(),
            latency: histogram(),
            errors: 0,
            started: Instant::now(),
        }
    }

    /// Waits until another message may be sent.
    pub(crate) async fn make_room(&mut self) {
        while self.pending.len() >= self.window {
            match self.pending.join_next().await {
                Some(done) => self.record(done),
                None => break,
            }
        }
    }

    /// Tracks the acknowledgement of a message sent at `sent`.
    pub(crate) fn track(
        &mut self,
        sent: Instant,
        ack: impl Future<Output = Result<(), String>> + Send + 'static,
    ) {
        self.pending
            .spawn(async move { ack.await.map(|()| sent.elapsed().as_micros() as u64) });
    }

    fn record(&mut self, done: Result<Result<u64, String>, tokio::task::JoinError>) {
        match done {
            Ok(Ok(us)) => {
                let _ = self.latency.record(u64::max(us, 1));
            }
            Ok(Err(_)) | Err(_) => self.errors += 1,
        }
    }

    /// Waits for every acknowledgement and reports the run.
    pub(crate) async fn finish(
        mut self,
        scenario: &str,
        parameters: serde_json::Value,
        load: &Load,
    ) -> Report {
        while let Some(done) = self.pending.join_next().await {
            self.record(done);
        }
        let elapsed = self.started.elapsed();
        let ok = load.count - self.errors;
        Report::new(
            scenario,
            parameters,
            Totals {
                messages: ok,
                bytes: ok * load.size as u64,
                elapsed,
                fsyncs: 0,
                errors: self.errors,
            },
            &self.latency,
        )
    }
}
