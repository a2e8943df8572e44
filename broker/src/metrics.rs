//! Process-wide counters, reported by the `Stats` request.

use escrow_proto::BrokerStats;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters since the process started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Durable commits (one fsync each).
    pub fsyncs: AtomicU64,
    /// Commands applied.
    pub commands_applied: AtomicU64,
    /// Messages appended.
    pub messages_appended: AtomicU64,
    /// Body bytes appended.
    pub bytes_appended: AtomicU64,
    /// Open client connections.
    pub connections: AtomicU64,
}

impl Metrics {
    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> BrokerStats {
        BrokerStats {
            fsyncs: self.fsyncs.load(Relaxed),
            commands_applied: self.commands_applied.load(Relaxed),
            messages_appended: self.messages_appended.load(Relaxed),
            bytes_appended: self.bytes_appended.load(Relaxed),
            connections: self.connections.load(Relaxed),
        }
    }
}
