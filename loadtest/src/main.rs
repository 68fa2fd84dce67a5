//! herald-loadtest: drives herald (or another WebSocket push server) with
//! many client connections and reports what it measured.
//!
//! A tour of the crate:
//! - [`cli`]: the command line; one subcommand per scenario.
//! - [`scenario`]: `connect`, `fanout` (and `slow`), `storm`, `churn`,
//!   `drain`; each module holds the parent's side and the client group's
//!   side of its scenario.
//! - [`group`]: a slice of the clients and the messages between it and the parent.
//! - [`worker`]: running groups in this process or in worker processes.
//! - [`client`]: one connection: TCP from a chosen source, upgrade, subscribe, failures.
//! - [`publisher`]: the open-loop publisher over HTTP or Redis, and each message's fate.
//! - [`fault`]: faults injected while measuring (`CLIENT KILL`, commands, SIGTERM).
//! - [`loss`]: a subscriber's losses judged against the outage; `gap` notices.
//! - [`history`]: loss accounting by offset on history channels; resuming with `since`.
//! - [`slowloris`]: sockets that never finish their request head.
//! - [`scrape`]: the gateways' `/metrics` and `--expect-metric`.
//! - [`scan`]: cheap integer-field lookup in received frames.
//! - [`stats`]: histograms, counts by reason, sequence tracking.
//! - [`proc`]: gateway memory and CPU from `/proc`.
//! - [`report`]: the table on stdout, the JSON summary, and the checks.
//! - [`chart`]: JSON summaries drawn as an SVG chart of latency against rate.

#![forbid(unsafe_code)]

mod chart;
mod cli;
mod client;
mod fault;
mod group;
mod history;
mod loss;
mod proc;
mod publisher;
mod report;
mod scan;
mod scenario;
mod scrape;
mod slowloris;
mod stats;
mod worker;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::scenario::{churn, connect, drain, fanout, storm};

/// How long leftover tasks (such as a pending stdin read) may delay exit.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald-loadtest: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald-loadtest: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = &cli.global;
    let summary = match &cli.command {
        Command::Worker => return worker::worker_main().await,
        Command::Chart(args) => return chart::run(args),
        Command::Connect(args) => connect::run(global, args).await?,
        Command::Fanout(args) => fanout::run(global, args, None).await?,
        Command::Slow(args) => fanout::run(global, &args.fanout, Some(args.slow_fraction)).await?,
        Command::Storm(args) => storm::run(global, args).await?,
        Command::Churn(args) => churn::run(global, args).await?,
        Command::Drain(args) => drain::run(global, args).await?,
    };
    summary.emit(global.json.as_deref())?;
    let failed = summary.failed_checks();
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} checks failed: {}",
            failed.len(),
            summary.checks.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
