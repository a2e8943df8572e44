//! Shared by the outbox tests: PostgreSQL (or a loud skip), topics, the relay binary.
#![allow(dead_code, unreachable_pub)]

use escrow_client::{Client, ClientConfig};
use escrow_proto::{CreateTopic, Request};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const RELAY: &str = env!("CARGO_BIN_EXE_escrow-relay");

/// `DATABASE_URL`, else the local server with trust auth.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".to_string())
}

/// A connection, or `None` after printing a loud skip notice (no server here).
pub async fn connect_or_skip(test: &str) -> Option<tokio_postgres::Client> {
    let url = database_url();
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await;
    match attempt {
        Ok(Ok((client, connection))) => {
            tokio::spawn(connection);
            Some(client)
        }
        Ok(Err(e)) => {
            skipped(&format!(
                "PostgreSQL not reachable at {url} ({e}); test {test} did not run"
            ));
            None
        }
        Err(_) => {
            skipped(&format!(
                "PostgreSQL not reachable at {url} (timed out); test {test} did not run"
            ));
            None
        }
    }
}

/// `eprintln!` and `std::io::stderr()` are captured by the test harness (and hidden for a
/// passing test), so write to a duplicate of the process's stderr descriptor instead.
fn skipped(why: &str) {
    use std::io::Write;
    use std::os::fd::AsFd;
    let line = format!("SKIPPED: {why}");
    match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => {
            let _ = writeln!(std::fs::File::from(fd), "{line}");
        }
        Err(_) => eprintln!("{line}"),
    }
}

/// Another connection to the same database.
pub async fn connect() -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) =
        tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A schema of its own for one test run (tests run in parallel).
pub async fn fresh_schema(client: &tokio_postgres::Client, test: &str) -> anyhow::Result<String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let schema = format!("ot_{test}_{}_{nanos}", std::process::id());
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await?;
    Ok(schema)
}

pub async fn drop_schema(client: &tokio_postgres::Client, schema: &str) {
    let _ = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await;
}

/// The outcome of a scenario run as a task (so its schema is dropped even if it panicked):
/// a panic is re-raised, a timeout becomes an error.
pub fn settle(
    result: Result<Result<anyhow::Result<()>, tokio::time::error::Elapsed>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match result {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => anyhow::bail!("scenario timed out"),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => anyhow::bail!("scenario task failed: {e}"),
    }
}

pub async fn create_topic(client: &ClientConfig, topic: &str, queues: u32) -> anyhow::Result<()> {
    let client = Client::connect(client.clone()).await?;
    client
        .request(&Request::CreateTopic(CreateTopic {
            topic: topic.into(),
            queues,
        }))
        .await?;
    client.close().await;
    Ok(())
}

/// A running `escrow-relay`, killed with SIGKILL when dropped.
pub struct RelayProcess {
    pub child: Child,
}

impl RelayProcess {
    pub fn spawn(args: &[&str]) -> anyhow::Result<RelayProcess> {
        let child = Command::new(RELAY)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(RelayProcess { child })
    }

    /// SIGKILL: no chance to finish a batch or roll back.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `escrow-relay` to completion and returns its stdout.
pub fn relay_cli(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(RELAY).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "escrow-relay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A tiny deterministic generator (no dependency needed for test data).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}
