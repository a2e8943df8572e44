//! The machine's own floor: how long a small write plus `fdatasync` takes on the disk
//! the broker uses, the same through a durable redb commit, and how much of the CPU the
//! hypervisor takes away meanwhile.
//!
//! Printed before cluster figures so runs on different machines or days can be compared
//! (the same build once ran 3–4x slower on one development VM than on the one before).

use crate::report::{histogram, Latency, Report, Totals};
use anyhow::Context;
use clap::Args;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub(crate) struct DiskArgs {
    /// Directory to measure in (a scratch file is created there and removed).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Bytes per write (at most 64 MiB).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=64 << 20))]
    size: u32,
    /// Writes, each followed by `fdatasync`.
    #[arg(long, default_value_t = 1000)]
    count: u64,
}

pub(crate) fn disk(args: DiskArgs) -> anyhow::Result<Report> {
    let path = args
        .dir
        .join(format!(".escrow-bench-disk-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let measured = sync_writes(&file, &args);
    drop(file);
    let _ = std::fs::remove_file(&path);
    let (latency, elapsed) = measured?;
    let db_path = path.with_extension("redb");
    let commits = redb_commits(&db_path, &args);
    let _ = std::fs::remove_file(&db_path);
    let commits = Latency::of(&commits?);
    eprintln!(
        "redb durable commit ({} bytes): p50 {:.3} ms, p99 {:.3} ms",
        args.size, commits.p50_ms, commits.p99_ms
    );
    Ok(Report::new(
        "disk",
        serde_json::json!({ "dir": args.dir, "size": args.size, "count": args.count }),
        Totals {
            messages: args.count,
            bytes: args.count * u64::from(args.size),
            elapsed,
            fsyncs: args.count,
            errors: 0,
        },
        &latency,
    ))
}

fn sync_writes(
    file: &std::fs::File,
    args: &DiskArgs,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, std::time::Duration)> {
    let block = vec![0x5a_u8; args.size as usize];
    let mut latency = histogram();
    let steal_before = steal_ticks();
    let started = Instant::now();
    for i in 0..args.count {
        let t = Instant::now();
        file.write_all_at(&block, i * u64::from(args.size))?;
        file.sync_data()?;
        let _ = latency.record((t.elapsed().as_micros() as u64).max(1));
    }
    let elapsed = started.elapsed();
    if let Some(percent) = steal_percent_since(steal_before) {
        eprintln!("cpu steal during the run: {percent:.1} %");
    }
    Ok((latency, elapsed))
}

/// Durable redb commits of one `size`-byte value each: what the Raft log pays per write
/// on top of the bare `fdatasync` (redb writes its B-tree pages and header too).
fn redb_commits(
    path: &std::path::Path,
    args: &DiskArgs,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("disk");
    let db =
        redb::Database::create(path).with_context(|| format!("creating {}", path.display()))?;
    let value = vec![0x5a_u8; args.size as usize];
    let mut latency = histogram();
    for i in 0..args.count {
        let t = Instant::now();
        let txn = db.begin_write()?;
        txn.open_table(TABLE)?.insert(i, value.as_slice())?;
        txn.commit()?;
        let _ = latency.record((t.elapsed().as_micros() as u64).max(1));
    }
    Ok(latency)
}

/// (steal, total) CPU ticks from `/proc/stat`, where the kernel reports them.
fn steal_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    Some((*ticks.get(7)?, ticks.iter().sum()))
}

/// Share of CPU time stolen by the hypervisor since `before`.
fn steal_percent_since(before: Option<(u64, u64)>) -> Option<f64> {
    let (steal, total) = steal_ticks()?;
    let (steal0, total0) = before?;
    let total = total.checked_sub(total0).filter(|t| *t > 0)?;
    Some(100.0 * steal.saturating_sub(steal0) as f64 / total as f64)
}
