//! Running groups of clients: in this process, or in worker processes that
//! re-execute this binary in the hidden `worker` mode.
//!
//! A process may open at most 20,000 files, so more connections need more
//! processes. The parent keeps the scenario logic (and the publisher); the
//! workers only run clients. Each worker reads its [`GroupSpec`] and then
//! [`Command`]s as JSON lines on stdin, and writes [`Event`]s as JSON lines on
//! stdout, the last one being its report with base64 V2 histograms.

use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::group::{self, Command, Event, GroupSpec, Progress, Report};

/// Bound of each member's command queue; the parent sends at most two commands.
const COMMAND_QUEUE: usize = 4;
/// Bound of each member's event queue: progress events are small and frequent.
const EVENT_QUEUE: usize = 64;
/// How often the progress line is printed.
const PRINT_INTERVAL: Duration = Duration::from_secs(1);

/// The groups of one run, seen from the parent.
pub struct Fleet {
    /// One command sender per group.
    commands: Vec<mpsc::Sender<Command>>,
    /// Ready, report and failure events from all groups, tagged with the group number.
    events: mpsc::Receiver<(usize, Event)>,
    /// The latest counters of each group, for the progress line.
    progress: Arc<Mutex<Vec<Progress>>>,
    /// Prints the progress line every second until dropped.
    printer: JoinHandle<()>,
    /// Worker processes, to reap at the end; empty when running in-process.
    children: Vec<Child>,
}

impl Fleet {
    /// Starts one group per spec: in this process when there is one spec,
    /// otherwise one worker process each.
    pub fn start(specs: Vec<GroupSpec>) -> anyhow::Result<Fleet> {
        let groups = specs.len();
        let (events_in, events) = mpsc::channel(EVENT_QUEUE * groups.max(1));
        let progress = Arc::new(Mutex::new(vec![Progress::default(); groups]));
        let mut commands = Vec::with_capacity(groups);
        let mut children = Vec::new();
        let in_process = groups == 1;
        for (number, spec) in specs.into_iter().enumerate() {
            let (command_sender, command_receiver) = mpsc::channel(COMMAND_QUEUE);
            let (member_events, member_receiver) = mpsc::channel(EVENT_QUEUE);
            if in_process {
                tokio::spawn(group::run(spec, command_receiver, member_events));
            } else {
                let mut child = spawn_worker()?;
                let stdin = child.stdin.take().context("worker stdin")?;
                let stdout = child.stdout.take().context("worker stdout")?;
                tokio::spawn(write_commands(spec, command_receiver, stdin));
                tokio::spawn(read_events(stdout, member_events));
                children.push(child);
            }
            tokio::spawn(forward(
                number,
                member_receiver,
                events_in.clone(),
                progress.clone(),
            ));
            commands.push(command_sender);
        }
        let printer = tokio::spawn(print_progress(progress.clone()));
        Ok(Fleet {
            commands,
            events,
            progress,
            printer,
            children,
        })
    }

    /// Waits until every group reports its current phase complete.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let mut waiting = self.commands.len();
        while waiting > 0 {
            match self.next_event().await? {
                (_, Event::Ready) => waiting -= 1,
                (number, Event::Report(_)) => {
                    bail!("group {number} reported before it was told to finish")
                }
                (_, Event::Progress(_) | Event::Failed(_)) => {}
            }
        }
        Ok(())
    }

    /// Sends a command to every group.
    pub async fn command(&self, command: Command) -> anyhow::Result<()> {
        for sender in &self.commands {
            sender
                .send(command.clone())
                .await
                .context("a client group has stopped")?;
        }
        Ok(())
    }

    /// Sends `finish` and collects every group's report, then reaps the workers.
    pub async fn finish(mut self, finish: Command) -> anyhow::Result<Vec<Report>> {
        self.command(finish).await?;
        let mut reports = Vec::with_capacity(self.commands.len());
        while reports.len() < self.commands.len() {
            match self.next_event().await? {
                (_, Event::Report(report)) => reports.push(*report),
                (_, Event::Ready | Event::Progress(_) | Event::Failed(_)) => {}
            }
        }
        // Closing stdin lets every worker exit.
        self.commands.clear();
        for child in &mut self.children {
            let status = child.wait().await.context("waiting for a worker")?;
            if !status.success() {
                bail!("a worker exited with {status}");
            }
        }
        self.printer.abort();
        print_line(&self.total_progress(), None);
        Ok(reports)
    }

    /// The sum of every group's latest counters.
    pub fn total_progress(&self) -> Progress {
        total(&self.progress)
    }

    async fn next_event(&mut self) -> anyhow::Result<(usize, Event)> {
        match self.events.recv().await {
            Some((number, Event::Failed(message))) => bail!("client group {number}: {message}"),
            Some(event) => Ok(event),
            None => bail!("every client group has stopped"),
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.printer.abort();
    }
}

/// Runs this process as a worker: the spec and commands on stdin, events on stdout.
pub async fn worker_main() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await
        .context("reading the group spec")?
        .context("the worker mode is started by the parent process, not by hand")?;
    let spec: GroupSpec = serde_json::from_str(&first).context("parsing the group spec")?;
    let (command_sender, command_receiver) = mpsc::channel(COMMAND_QUEUE);
    let (event_sender, mut events) = mpsc::channel(EVENT_QUEUE);
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Command>(&line) {
                Ok(command) => {
                    if command_sender.send(command).await.is_err() {
                        return;
                    }
                }
                Err(error) => eprintln!("worker: ignoring a bad command line: {error}"),
            }
        }
    });
    tokio::spawn(group::run(spec, command_receiver, event_sender));
    let mut stdout = tokio::io::stdout();
    while let Some(event) = events.recv().await {
        let last = matches!(event, Event::Report(_) | Event::Failed(_));
        let mut line = serde_json::to_vec(&event).context("encoding an event")?;
        line.push(b'\n');
        stdout
            .write_all(&line)
            .await
            .context("writing to the parent")?;
        stdout.flush().await.context("writing to the parent")?;
        if last {
            break;
        }
    }
    Ok(())
}

fn spawn_worker() -> anyhow::Result<Child> {
    let executable = std::env::current_exe().context("finding this executable")?;
    Process::new(executable)
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker process")
}

/// Writes the spec, then each command, as JSON lines to a worker's stdin.
/// Returning drops stdin, which tells the worker no more commands will come.
async fn write_commands(
    spec: GroupSpec,
    mut commands: mpsc::Receiver<Command>,
    mut stdin: ChildStdin,
) {
    let Ok(mut line) = serde_json::to_vec(&spec) else {
        return;
    };
    loop {
        line.push(b'\n');
        if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
        let Some(command) = commands.recv().await else {
            return;
        };
        let Ok(encoded) = serde_json::to_vec(&command) else {
            return;
        };
        line = encoded;
    }
}

/// Parses a worker's stdout into events; a worker that ends without a
/// report becomes a [`Event::Failed`].
async fn read_events(stdout: ChildStdout, events: mpsc::Sender<Event>) {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let event = match lines.next_line().await {
            Ok(Some(line)) => serde_json::from_str::<Event>(&line).unwrap_or_else(|error| {
                Event::Failed(format!("unreadable worker output: {error}"))
            }),
            Ok(None) => Event::Failed("the worker exited without a report".to_owned()),
            Err(error) => Event::Failed(format!("reading the worker's output: {error}")),
        };
        let last = matches!(event, Event::Report(_) | Event::Failed(_));
        if events.send(event).await.is_err() || last {
            return;
        }
    }
}

/// Keeps progress counters up to date and passes every other event on. A
/// group that stops without a final event (it panicked) becomes a failure,
/// so the parent never waits for it forever.
async fn forward(
    number: usize,
    mut member: mpsc::Receiver<Event>,
    events: mpsc::Sender<(usize, Event)>,
    progress: Arc<Mutex<Vec<Progress>>>,
) {
    while let Some(event) = member.recv().await {
        match event {
            Event::Progress(counters) => {
                progress.lock().unwrap_or_else(PoisonError::into_inner)[number] = counters;
            }
            other => {
                let last = matches!(other, Event::Report(_) | Event::Failed(_));
                if events.send((number, other)).await.is_err() || last {
                    return;
                }
            }
        }
    }
    let stopped = Event::Failed("the client group stopped unexpectedly".to_owned());
    let _ = events.send((number, stopped)).await;
}

fn total(progress: &Mutex<Vec<Progress>>) -> Progress {
    let mut sum = Progress::default();
    for counters in progress
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        sum.add(counters);
    }
    sum
}

/// Prints `connected / deliveries/s / errors` to stderr every second.
async fn print_progress(progress: Arc<Mutex<Vec<Progress>>>) {
    let start = Instant::now();
    let mut ticks = tokio::time::interval(PRINT_INTERVAL);
    ticks.tick().await;
    let mut previous = Progress::default();
    let mut previous_at = start;
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let current = total(&progress);
        let seconds = (now - previous_at).as_secs_f64();
        let rate = (current.deliveries.saturating_sub(previous.deliveries)) as f64 / seconds;
        print_line(&current, Some((now - start, rate)));
        previous = current;
        previous_at = now;
    }
}

fn print_line(progress: &Progress, timing: Option<(Duration, f64)>) {
    match timing {
        Some((elapsed, rate)) => eprintln!(
            "[{:>5.1}s] connected {:>7}  deliveries/s {:>9.0}  errors {}",
            elapsed.as_secs_f64(),
            progress.connected,
            rate,
            progress.errors
        ),
        None => eprintln!(
            "[ done ] connected {:>7}  deliveries {:>9}  errors {}",
            progress.connected, progress.deliveries, progress.errors
        ),
    }
}
