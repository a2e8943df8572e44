//! Latency recording and the report every scenario produces.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Latencies in microseconds, 1 us to 60 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Percentiles in milliseconds.
#[derive(Debug, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) samples: u64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            samples: h.len(),
        }
    }
}

/// What a scenario measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) parameters: serde_json::Value,
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    pub(crate) seconds: f64,
    pub(crate) msgs_per_sec: f64,
    pub(crate) mb_per_sec: f64,
    /// Per request: publish to durable ack, or receive to ack.
    pub(crate) latency: Latency,
    /// Publish (born_at) to receive, by the wall clock; drain only.
    pub(crate) end_to_end: Option<Latency>,
    /// Broker fsyncs during the run (from its counters).
    pub(crate) fsyncs: u64,
    pub(crate) fsyncs_per_sec: f64,
    pub(crate) errors: u64,
}

/// Counts of one measured run.
#[derive(Debug)]
pub(crate) struct Totals {
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    pub(crate) elapsed: Duration,
    pub(crate) fsyncs: u64,
    pub(crate) errors: u64,
}

impl Report {
    pub(crate) fn new(
        scenario: &str,
        parameters: serde_json::Value,
        totals: Totals,
        latency: &Histogram<u64>,
    ) -> Report {
        let Totals {
            messages,
            bytes,
            elapsed,
            fsyncs,
            errors,
        } = totals;
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Report {
            scenario: scenario.to_string(),
            parameters,
            messages,
            bytes,
            seconds,
            msgs_per_sec: messages as f64 / seconds,
            mb_per_sec: bytes as f64 / seconds / 1_000_000.0,
            latency: Latency::of(latency),
            end_to_end: None,
            fsyncs,
            fsyncs_per_sec: fsyncs as f64 / seconds,
            errors,
        }
    }

    pub(crate) fn print(&self) {
        println!("scenario      {} {}", self.scenario, self.parameters);
        println!(
            "throughput    {:.0} msgs/s, {:.1} MB/s ({} messages in {:.2} s, {} errors)",
            self.msgs_per_sec, self.mb_per_sec, self.messages, self.seconds, self.errors
        );
        let l = &self.latency;
        if l.samples == 0 {
            println!("latency       not measured");
        } else {
            println!(
                "latency       p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
                l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
            );
        }
        if let Some(e) = &self.end_to_end {
            println!(
                "end to end    p50 {:.3} ms, p99 {:.3} ms",
                e.p50_ms, e.p99_ms
            );
        }
        println!(
            "fsyncs        {} ({:.0}/s, {:.1} messages per fsync)",
            self.fsyncs,
            self.fsyncs_per_sec,
            self.messages as f64 / self.fsyncs.max(1) as f64
        );
    }
}

/// Prints progress to stderr once a second until dropped.
pub(crate) fn progress(
    label: &'static str,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    total: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = done.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!("{label}: {now}/{total} ({} msgs/s)", now - last);
            last = now;
        }
    })
}
