//! Helpers for tests that run the `escrow` binary as real processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Starts `escrow ARGS`, waits for the first line it prints (its banner) and keeps
/// draining its output so it never writes to a closed pipe.
pub(crate) fn spawn_escrow(args: &[&str]) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_escrow"))
        .args(args)
        .env("RUST_LOG", "warn,openraft=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut reader = BufReader::new(stdout);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok((child, first))
}
