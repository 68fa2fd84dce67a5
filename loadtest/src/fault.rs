//! Faults injected while a run measures: `CLIENT KILL TYPE pubsub` at a
//! fixed interval, shell commands at set moments (killing, restarting or
//! pausing Redis), and SIGTERM to the gateways with the time each took to
//! exit. Each fault is logged with when it happened, relative to the start
//! of the measurement.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cli::TimedCommand;
use crate::client::unix_nanos;
use crate::report::round3;

/// How often a signalled process is checked for having exited.
const EXIT_POLL: Duration = Duration::from_millis(5);
/// How long a signalled process is watched at most.
const EXIT_WATCH_LIMIT: Duration = Duration::from_secs(300);

/// The faults of one run.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// `CLIENT KILL TYPE pubsub` every this long, while publishing.
    pub kill_pubsub_every: Option<Duration>,
    /// Where to send `CLIENT KILL`.
    pub redis_url: Option<String>,
    /// Shell commands at set moments.
    pub commands: Vec<TimedCommand>,
    /// SIGTERM to `pids` at this moment.
    pub sigterm_at: Option<Duration>,
    pub pids: Vec<u32>,
}

impl FaultPlan {
    pub fn is_empty(&self) -> bool {
        self.kill_pubsub_every.is_none() && self.commands.is_empty() && self.sigterm_at.is_none()
    }
}

/// What was done, and when (milliseconds after the measurement started).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultLog {
    pub kills: Vec<Kill>,
    pub commands: Vec<CommandRun>,
    pub signals: Vec<SignalRun>,
}

impl FaultLog {
    /// `CLIENT KILL`s that killed at least one connection.
    pub fn effective_kills(&self) -> u64 {
        self.kills
            .iter()
            .filter(|kill| kill.killed.is_some_and(|killed| killed > 0))
            .count() as u64
    }
}

/// One `CLIENT KILL TYPE pubsub`.
#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    pub at_ms: f64,
    /// Connections Redis killed; `None` when the command failed.
    pub killed: Option<u64>,
    pub error: Option<String>,
}

/// One `--fault-exec` command.
#[derive(Debug, Clone, Serialize)]
pub struct CommandRun {
    pub command: String,
    pub at_ms: f64,
    pub took_ms: f64,
    /// Its exit status; `None` when it could not run or was killed by a signal.
    pub status: Option<i32>,
}

/// One SIGTERM and how long its process took to exit.
#[derive(Debug, Clone, Serialize)]
pub struct SignalRun {
    pub pid: u32,
    pub at_ms: f64,
    /// When the signal was sent, in unix nanoseconds.
    #[serde(skip)]
    pub at_unix_nanos: i64,
    /// From the signal to the process being gone; `None` if it was still
    /// running after [`EXIT_WATCH_LIMIT`] or could not be signalled.
    pub exited_after_ms: Option<f64>,
    pub error: Option<String>,
}

/// Faults in progress.
pub struct Running {
    kills: Option<JoinHandle<Vec<Kill>>>,
    commands: Vec<JoinHandle<CommandRun>>,
    signals: Vec<JoinHandle<SignalRun>>,
}

/// Starts every fault of `plan`, timed from `start`, within `duration`
/// (the interval kills stop there; one-off faults happen when they are due).
pub async fn start(
    plan: &FaultPlan,
    start: Instant,
    duration: Duration,
) -> anyhow::Result<Running> {
    let kills = match plan.kill_pubsub_every {
        Some(every) => {
            let url = plan
                .redis_url
                .as_deref()
                .context("--kill-pubsub-every needs --fault-redis-url or --redis-url")?;
            let client = redis::Client::open(url).context("invalid Redis URL for the faults")?;
            let connection = client
                .get_multiplexed_async_connection()
                .await
                .context("connecting to Redis for the faults")?;
            Some(tokio::spawn(kill_pubsub(
                connection, every, start, duration,
            )))
        }
        None => None,
    };
    let commands = plan
        .commands
        .iter()
        .map(|command| tokio::spawn(run_command(command.clone(), start)))
        .collect();
    let signals = match plan.sigterm_at {
        Some(at) => plan
            .pids
            .iter()
            .map(|&pid| tokio::spawn(sigterm(pid, start, start + at)))
            .collect(),
        None => Vec::new(),
    };
    Ok(Running {
        kills,
        commands,
        signals,
    })
}

impl Running {
    /// Waits for every fault to be done (a signalled process to exit, at most
    /// [`EXIT_WATCH_LIMIT`]) and returns the log.
    pub async fn finish(self) -> anyhow::Result<FaultLog> {
        let mut log = FaultLog::default();
        if let Some(kills) = self.kills {
            log.kills = kills.await.context("the CLIENT KILL task failed")?;
        }
        for command in self.commands {
            log.commands
                .push(command.await.context("a fault command task failed")?);
        }
        for signal in self.signals {
            log.signals
                .push(signal.await.context("a signal task failed")?);
        }
        Ok(log)
    }
}

fn since_ms(start: Instant) -> f64 {
    round3(
        Instant::now()
            .saturating_duration_since(start)
            .as_secs_f64()
            * 1000.0,
    )
}

async fn kill_pubsub(
    mut connection: redis::aio::MultiplexedConnection,
    every: Duration,
    start: Instant,
    duration: Duration,
) -> Vec<Kill> {
    let mut kills = Vec::new();
    let mut next = every;
    while next < duration {
        tokio::time::sleep_until(start + next).await;
        let at_ms = since_ms(start);
        let result = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async::<u64>(&mut connection)
            .await;
        kills.push(match result {
            Ok(killed) => Kill {
                at_ms,
                killed: Some(killed),
                error: None,
            },
            Err(error) => Kill {
                at_ms,
                killed: None,
                error: Some(error.to_string()),
            },
        });
        next += every;
    }
    kills
}

async fn run_command(command: TimedCommand, start: Instant) -> CommandRun {
    tokio::time::sleep_until(start + command.at).await;
    let at_ms = since_ms(start);
    let began = Instant::now();
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command.command)
        .stdin(std::process::Stdio::null())
        .status()
        .await;
    let took_ms = round3(began.elapsed().as_secs_f64() * 1000.0);
    if let Err(error) = &status {
        eprintln!("fault command {:?} did not run: {error}", command.command);
    }
    CommandRun {
        command: command.command,
        at_ms,
        took_ms,
        status: status.ok().and_then(|status| status.code()),
    }
}

async fn sigterm(pid: u32, start: Instant, at: Instant) -> SignalRun {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    tokio::time::sleep_until(at).await;
    let at_ms = since_ms(start);
    let at_unix_nanos = unix_nanos();
    let signalled = Instant::now();
    let Ok(raw) = i32::try_from(pid) else {
        return SignalRun {
            pid,
            at_ms,
            at_unix_nanos,
            exited_after_ms: None,
            error: Some("not a process id".to_owned()),
        };
    };
    if let Err(errno) = kill(Pid::from_raw(raw), Signal::SIGTERM) {
        return SignalRun {
            pid,
            at_ms,
            at_unix_nanos,
            exited_after_ms: None,
            error: Some(format!("kill: {errno}")),
        };
    }
    while signalled.elapsed() < EXIT_WATCH_LIMIT {
        if !alive(pid) {
            return SignalRun {
                pid,
                at_ms,
                at_unix_nanos,
                exited_after_ms: Some(round3(signalled.elapsed().as_secs_f64() * 1000.0)),
                error: None,
            };
        }
        tokio::time::sleep(EXIT_POLL).await;
    }
    SignalRun {
        pid,
        at_ms,
        at_unix_nanos,
        exited_after_ms: None,
        error: Some("still running".to_owned()),
    }
}

/// Whether `pid` is a running process: it exists and is not a zombie (a
/// process that exited but that its parent has not reaped yet).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|end| stat[end + 1..].split_whitespace().next());
            !matches!(state, Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }

    #[tokio::test]
    async fn commands_run_when_due_and_report_their_status() {
        let plan = FaultPlan {
            commands: vec![
                TimedCommand {
                    at: Duration::from_millis(30),
                    command: "exit 3".to_owned(),
                },
                TimedCommand {
                    at: Duration::ZERO,
                    command: "true".to_owned(),
                },
            ],
            ..FaultPlan::default()
        };
        let running = start(&plan, Instant::now(), Duration::from_secs(1))
            .await
            .unwrap();
        let log = running.finish().await.unwrap();
        assert_eq!(log.commands.len(), 2);
        assert_eq!(log.commands[0].status, Some(3));
        assert!(log.commands[0].at_ms >= 30.0, "{log:?}");
        assert_eq!(log.commands[1].status, Some(0));
    }
}
