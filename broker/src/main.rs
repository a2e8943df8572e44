//! `escrow`: run a broker node and talk to one.

mod cli;

use clap::Parser;

/// jemalloc, as TiKV uses: with glibc's malloc a transaction cost 15-20 % more broker
/// CPU (consolidation before each allocation of 1 KiB or more, slow aligned allocations
/// in every redb write transaction); publish costs the same. See docs/performance.md.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    stop_quietly_when_stdout_closes();
    let args = cli::Cli::parse();
    cli::init_tracing(&args);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // Half the cores for async work unless `TOKIO_WORKER_THREADS` says otherwise: the log
    // writer and blocking applies run on threads of their own, and on two cores a second
    // worker cost a node 30 % more CPU in cross-thread wake-ups (docs/performance.md).
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads((cores / 2).max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("escrow: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("escrow: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Exit status of a process ended by SIGPIPE, as shells report it.
const CLOSED_STDOUT_EXIT: i32 = 128 + 13;

/// `escrow … | head` closes the pipe early: end like other command-line tools (status
/// 141, nothing on stderr) instead of with the panic `println!` raises on EPIPE. Rust
/// ignores SIGPIPE, and restoring it would take `unsafe`.
fn stop_quietly_when_stdout_closes() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        let broken_pipe = format!("{}", std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        if message.starts_with("failed printing to stdout")
            && (message.contains("os error 32") || message.contains(&broken_pipe))
        {
            std::process::exit(CLOSED_STDOUT_EXIT);
        }
        report(info);
    }));
}
