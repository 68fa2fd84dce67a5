//! The scenarios. Each module holds both sides of one scenario: `run`, which
//! the parent executes (starting the client groups, publishing, sampling the
//! gateway, building the summary), and `run_group`, which each client group
//! executes.

pub mod churn;
pub mod connect;
pub mod drain;
pub mod fanout;
pub mod storm;

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::Value;

use crate::cli::GlobalArgs;
use crate::client::{Auth, ClientSpec, unix_nanos};
use crate::group::{GroupSpec, Plan, Slice};
use crate::report::CheckOutcome;
use crate::scrape::{Expectation, Watch};

/// How far ahead of now a ramp starts, so that every group is up by then:
/// a worker process needs a moment to start.
const IN_PROCESS_LEAD: Duration = Duration::from_millis(50);
const WORKER_LEAD: Duration = Duration::from_millis(500);

/// The client half of the global options, checked.
pub fn client_spec(global: &GlobalArgs) -> anyhow::Result<ClientSpec> {
    if global.urls.is_empty() {
        bail!("give at least one --url ws://HOST:PORT/ws");
    }
    if global.source_ips == 0 {
        bail!("--source-ips must be at least 1");
    }
    if global.ts_field.is_empty() || global.seq_field.is_empty() {
        bail!("--ts-field and --seq-field must not be empty");
    }
    let auth = match (&global.secret, &global.token) {
        (Some(secret), _) => Auth::Secret(secret.clone()),
        (None, Some(token)) => Auth::Token(token.clone()),
        (None, None) => Auth::None,
    };
    Ok(ClientSpec {
        urls: global.urls.clone(),
        auth,
        source_ips: global.source_ips,
        connect_timeout: global.connect_timeout,
        subscribe_frame: global.subscribe_frame.clone(),
        subscribed_match: global.subscribed_match.clone(),
        subscribe_error_match: global.subscribe_error_match.clone(),
        ts_field: global.ts_field.clone(),
        seq_field: global.seq_field.clone(),
        ca_file: global.ca_file.clone(),
    })
}

/// One spec per worker (`--workers`), each with its slice of the clients.
pub fn group_specs(global: &GlobalArgs, plan: Plan) -> anyhow::Result<Vec<GroupSpec>> {
    if global.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let clients = client_spec(global)?;
    Ok((0..global.workers)
        .map(|group| GroupSpec {
            slice: Slice {
                group,
                groups: global.workers,
            },
            clients: clients.clone(),
            plan: plan.clone(),
        })
        .collect())
}

/// When the clients' ramp starts, in unix nanoseconds.
pub fn ramp_start(global: &GlobalArgs) -> i64 {
    let lead = if global.workers > 1 {
        WORKER_LEAD
    } else {
        IN_PROCESS_LEAD
    };
    unix_nanos() + lead.as_nanos() as i64
}

/// The global and scenario options as JSON objects for the summary.
pub fn options(global: &GlobalArgs, scenario: &impl Serialize) -> anyhow::Result<Vec<Value>> {
    Ok(vec![
        serde_json::to_value(global).context("encoding the options")?,
        serde_json::to_value(scenario).context("encoding the options")?,
    ])
}

/// Checks that a rate is a positive, finite number.
pub fn positive_rate(name: &str, rate: f64) -> anyhow::Result<()> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("{name} must be a positive number");
    }
    Ok(())
}

/// One check per `--expect-metric`, on the scrapes `watch` took.
pub fn metric_checks(watch: &Watch, expectations: &[Expectation]) -> Vec<CheckOutcome> {
    watch
        .check(expectations)
        .into_iter()
        .map(|outcome| {
            let detail = match outcome.actual {
                Some(actual) => format!("actual {actual}"),
                None => "a scrape failed".to_owned(),
            };
            CheckOutcome::new(
                format!("metric {}", outcome.expectation),
                outcome.passed,
                detail,
            )
        })
        .collect()
}
