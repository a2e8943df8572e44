//! Group commit: concurrent proposals share one write transaction and one fsync.
//!
//! Request handlers [`CommitHandle::propose`] commands; a dedicated thread takes
//! whatever has queued up while the previous commit was syncing, applies it as one
//! [`Batch`] through the [`StateMachine`], commits durably, refreshes the shared
//! read view and only then answers. Nobody sees a change before it is durable.

use crate::metrics::Metrics;
use crate::state::command::{Batch, Command, Output};
use crate::state::{Index, StateMachine};
use escrow_proto::{ErrorCode, ErrorResponse};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot, watch};

/// Most commands in one batch.
const MAX_BATCH_COMMANDS: usize = 4096;
/// Most message body bytes in one batch, so one commit stays bounded.
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Proposals that may wait for the committer before publishers are pushed back.
const QUEUE_DEPTH: usize = 16 * 1024;

/// A command's durable outcome.
#[derive(Debug)]
pub struct Committed {
    /// What applying it produced.
    pub output: Output,
    /// Commit index of the batch it was in.
    pub commit_index: u64,
}

struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<Committed, ErrorResponse>>,
}

/// Submits commands to the committer.
#[derive(Clone, Debug)]
pub struct CommitHandle {
    tx: mpsc::Sender<Proposal>,
}

impl CommitHandle {
    /// Proposes a command and waits until it is durable (or refused).
    pub async fn propose(&self, command: Command) -> Result<Committed, ErrorResponse> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal { command, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> ErrorResponse {
    ErrorResponse::new(ErrorCode::SHUTTING_DOWN, "the commit pipeline has stopped")
}

fn body_bytes(command: &Command) -> usize {
    match command {
        Command::Append { records, .. } => records.iter().map(|(_, m)| m.body.len()).sum(),
        _ => 0,
    }
}

/// Everything the committer updates after each durable commit.
#[derive(Debug)]
pub struct Published {
    /// Read view for request handlers.
    pub view: Arc<RwLock<Index>>,
    /// Bumped after every commit, to wake long-polling receivers.
    pub commits: watch::Sender<u64>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// Starts the committer thread. It ends when every [`CommitHandle`] is dropped.
pub fn start(
    machine: StateMachine,
    published: Published,
) -> std::io::Result<(CommitHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let thread = std::thread::Builder::new()
        .name("escrow-commit".into())
        .spawn(move || run(machine, published, rx))?;
    Ok((CommitHandle { tx }, thread))
}

fn run(mut machine: StateMachine, published: Published, mut rx: mpsc::Receiver<Proposal>) {
    let mut last_at = 0;
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = body_bytes(&first.command);
        let mut proposals = vec![first];
        while proposals.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += body_bytes(&p.command);
                    proposals.push(p);
                }
                Err(_) => break,
            }
        }
        // The leader's clock never runs backwards within the log.
        last_at = escrow_client::now_ms().max(last_at);
        let (commands, replies): (Vec<_>, Vec<_>) =
            proposals.into_iter().map(|p| (p.command, p.reply)).unzip();
        let batch = Batch {
            at_ms: last_at,
            commands,
        };
        match machine.apply(&batch) {
            Ok((outputs, touched)) => {
                let index = machine.index();
                {
                    let mut view = published.view.write().unwrap_or_else(|e| e.into_inner());
                    view.commit_index = index.commit_index;
                    for name in &touched.topics {
                        if let Some(t) = index.topics.get(name) {
                            view.topics.insert(name.clone(), t.clone());
                        }
                    }
                    for key in &touched.progress {
                        if let Some(p) = index.progress.get(key) {
                            view.progress.insert(key.clone(), p.clone());
                        }
                    }
                }
                let m = &published.metrics;
                m.fsyncs.fetch_add(1, Relaxed);
                m.commands_applied
                    .fetch_add(batch.commands.len() as u64, Relaxed);
                for command in &batch.commands {
                    if let Command::Append { records, .. } = command {
                        m.messages_appended.fetch_add(records.len() as u64, Relaxed);
                    }
                }
                m.bytes_appended.fetch_add(bytes as u64, Relaxed);
                published.commits.send_replace(index.commit_index);
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(Committed {
                        output,
                        commit_index: index.commit_index,
                    }));
                }
            }
            Err(e) => {
                // The in-memory index may now be ahead of disk: stop writing until a restart reloads it.
                tracing::error!(error = %e, "durable commit failed; refusing further writes");
                let error = ErrorResponse::new(
                    ErrorCode::STORAGE_FAILURE,
                    format!("durable commit failed ({e}); the node refuses writes until restarted"),
                );
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
                rx.close();
                while let Some(p) = rx.blocking_recv() {
                    let _ = p.reply.send(Err(error.clone()));
                }
                return;
            }
        }
    }
}
