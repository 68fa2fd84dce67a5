//! Prometheus metrics. The only module that touches the `prometheus` crate: the
//! rest of the node calls typed methods such as [`Metrics::message_dropped`].
//! Every metric is prefixed `herald_`; `docs/configuration.md` lists them all.

use std::sync::Arc;

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::auth::AuthError;
use crate::config::SlowPolicy;
use crate::history::Unrecoverable;
use crate::protocol::{CloseCode, ErrorCode};

/// Every `reason` of `herald_connections_rejected_total`.
const REJECTION_REASONS: [&str; 9] = [
    "bad_handshake",
    "draining",
    "forbidden_origin",
    "max_connections",
    "max_connections_per_ip",
    "connection_rate",
    "connection_rate_per_ip",
    "unauthorized",
    "client_certificate_required",
];

/// The `reason` and `policy` values of `herald_messages_dropped_total`.
const DROP_REASONS: [&str; 4] = ["queue_full", "conflated", "rate_limited", "too_large"];
const DROP_POLICIES: [&str; 4] = ["disconnect", "drop_oldest", "conflate", "none"];

/// Every `reason` of `herald_http_connection_errors_total`.
const HTTP_CONNECTION_ERRORS: [&str; 6] = [
    "header_timeout",
    "header_too_large",
    "malformed",
    "io",
    "too_many_connections",
    "idle_timeout",
];

/// Every `outcome` of `herald_client_publishes_total`.
const PUBLISH_OUTCOMES: [&str; 6] = [
    "ok",
    "forbidden",
    "invalid_channel",
    "too_large",
    "rate_limited",
    "broker_unavailable",
];

/// A cheap-to-clone handle to the node's metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    connections_open: IntGauge,
    connections_accepted: IntCounter,
    connections_rejected: IntCounterVec,
    disconnects: IntCounterVec,
    subscriptions: IntGauge,
    channels: IntGauge,
    messages_published: IntCounter,
    messages_received: IntCounter,
    frames_delivered: IntCounter,
    messages_dropped: IntCounterVec,
    /// `messages_dropped` resolved for every reason and policy.
    drops: [[IntCounter; 4]; 4],
    auth_failures: IntCounterVec,
    client_errors: IntCounterVec,
    http_requests: IntCounterVec,
    http_connection_errors: IntCounterVec,
    broker_connected: IntGauge,
    broker_reconnects: IntCounter,
    broker_resubscribed_channels: IntCounter,
    gap_notices: IntCounter,
    broker_probe_failures: IntCounter,
    broker_stale_pushes: IntCounter,
    tls_handshake_failures: IntCounterVec,
    tls_handshakes_in_progress: IntGauge,
    tls_reloads: IntCounterVec,
    broker_unsolicited_unsubscribes: IntCounter,
    broker_links: IntGauge,
    broker_links_up: IntGauge,
    broker_roundtrip: Histogram,
    broker_function_load_failures: IntCounter,
    messages_unsequenced: IntCounter,
    history_duplicates: IntCounter,
    history_buffer_overflows: IntCounter,
    history_filled: IntCounter,
    history_recoveries: IntCounterVec,
    history_recovered_messages: IntCounter,
    history_fetch: Histogram,
    client_publishes: IntCounterVec,
    jwks_fetches: IntCounterVec,
    jwks_keys: IntGauge,
    jwks_last_success: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

impl Metrics {
    /// A fresh registry. Each node has its own, so tests can run many nodes in
    /// one process.
    pub fn new(node_id: &str) -> Metrics {
        let registry = Registry::new_custom(
            Some("herald".to_owned()),
            Some(
                [("node".to_owned(), node_id.to_owned())]
                    .into_iter()
                    .collect(),
            ),
        )
        .expect("valid registry");
        let r = &registry;
        let messages_dropped = counter_vec(
            r,
            "messages_dropped_total",
            "Messages not delivered to a subscriber, by reason and channel policy.",
            &["reason", "policy"],
        );
        let inner = Inner {
            connections_open: gauge(r, "connections_open", "Open WebSocket connections."),
            connections_accepted: counter(
                r,
                "connections_accepted_total",
                "WebSocket upgrades accepted.",
            ),
            connections_rejected: counter_vec(
                r,
                "connections_rejected_total",
                "WebSocket upgrade requests refused, by reason.",
                &["reason"],
            ),
            disconnects: counter_vec(
                r,
                "disconnects_total",
                "Closed WebSocket connections, by close reason.",
                &["reason"],
            ),
            subscriptions: gauge(
                r,
                "subscriptions",
                "Active client subscriptions on this node.",
            ),
            channels: gauge(
                r,
                "channels",
                "Channels with at least one local subscriber.",
            ),
            messages_published: counter(
                r,
                "messages_published_total",
                "Messages accepted by POST /api/publish.",
            ),
            messages_received: counter(
                r,
                "messages_received_total",
                "Messages this node received from its broker for fan-out.",
            ),
            frames_delivered: counter(
                r,
                "frames_delivered_total",
                "Message frames written to client sockets.",
            ),
            drops: std::array::from_fn(|reason| {
                std::array::from_fn(|policy| {
                    messages_dropped
                        .with_label_values(&[DROP_REASONS[reason], DROP_POLICIES[policy]])
                })
            }),
            messages_dropped,
            auth_failures: counter_vec(
                r,
                "auth_failures_total",
                "Tokens refused, by reason.",
                &["reason"],
            ),
            client_errors: counter_vec(
                r,
                "client_errors_total",
                "Error frames and per-channel errors sent to clients, by code.",
                &["code"],
            ),
            http_requests: counter_vec(
                r,
                "http_requests_total",
                "HTTP requests, by route and status.",
                &["route", "status"],
            ),
            http_connection_errors: counter_vec(
                r,
                "http_connection_errors_total",
                "HTTP connections dropped before a response: header_timeout, header_too_large, malformed, io.",
                &["reason"],
            ),
            broker_connected: gauge(
                r,
                "broker_connected",
                "1 while the node is connected and subscribed to its broker.",
            ),
            broker_reconnects: counter(
                r,
                "broker_reconnects_total",
                "Reconnections to the broker after a loss.",
            ),
            broker_resubscribed_channels: counter(
                r,
                "broker_resubscribed_channels_total",
                "Channels resubscribed after reconnecting to the broker.",
            ),
            gap_notices: counter(
                r,
                "gap_notices_total",
                "Gap frames sent to clients after a broker outage.",
            ),
            broker_probe_failures: counter(
                r,
                "broker_probe_failures_total",
                "Probes that did not come back from the broker in time.",
            ),
            broker_unsolicited_unsubscribes: counter(
                r,
                "broker_unsolicited_unsubscribes_total",
                "Wanted channels that Redis unsubscribed on its own (a cluster slot moved or failed over); each rebuilds its link.",
            ),
            broker_links: gauge(
                r,
                "broker_links",
                "Redis connections carrying subscriptions: 1 for standalone Redis, one per primary for Redis Cluster.",
            ),
            broker_links_up: gauge(
                r,
                "broker_links_up",
                "Redis connections carrying subscriptions that are connected and subscribed.",
            ),
            tls_handshake_failures: counter_vec(
                r,
                "tls_handshake_failures_total",
                "TLS handshakes that did not complete, by reason.",
                &["reason"],
            ),
            tls_handshakes_in_progress: gauge(
                r,
                "tls_handshakes_in_progress",
                "TLS handshakes under way (bounded by server.tls.max_handshakes).",
            ),
            tls_reloads: counter_vec(
                r,
                "tls_reloads_total",
                "Certificate reloads after the TLS files changed, by result (ok or error).",
                &["result"],
            ),
            broker_stale_pushes: counter(
                r,
                "broker_stale_pushes_total",
                "Messages dropped because they came from a broker connection already replaced.",
            ),
            broker_roundtrip: {
                let metric = Histogram::with_opts(
                    HistogramOpts::new(
                        "broker_roundtrip_seconds",
                        "Redis round trips: probe publish-to-receive and subscribe commands.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                )
                .expect("valid metric");
                r.register(Box::new(metric.clone()))
                    .expect("metric registered once");
                metric
            },
            jwks_fetches: counter_vec(
                r,
                "jwks_fetches_total",
                "Fetches of auth.jwks_url, by trigger (startup, interval, unknown_kid) and outcome (ok, unreachable, tls_error, http_error, http_status, too_large, timeout, invalid).",
                &["trigger", "outcome"],
            ),
            jwks_keys: gauge(
                r,
                "jwks_keys",
                "Signing keys in the last good key set of auth.jwks_url.",
            ),
            jwks_last_success: gauge(
                r,
                "jwks_last_success_timestamp_seconds",
                "When auth.jwks_url was last fetched successfully, in seconds since the Unix epoch; 0 before.",
            ),
            broker_function_load_failures: counter(
                r,
                "broker_function_load_failures_total",
                "Failed loads of the herald Redis Function library (history channels cannot be published).",
            ),
            messages_unsequenced: counter(
                r,
                "messages_unsequenced_total",
                "Messages on history channels that arrived without an offset (a raw PUBLISH): delivered live, not recoverable.",
            ),
            history_duplicates: counter(
                r,
                "history_duplicates_total",
                "Messages on history channels dropped because the node had delivered their offset already.",
            ),
            history_buffer_overflows: counter(
                r,
                "history_buffer_overflows_total",
                "Live messages on history channels not buffered during a fill or join because the buffer was full; the next fill fetches them.",
            ),
            history_filled: counter(
                r,
                "history_filled_messages_total",
                "Messages the node fetched from history to fill a gap on its own channels.",
            ),
            history_recoveries: counter_vec(
                r,
                "history_recoveries_total",
                "Client recoveries (subscribes with since), by outcome and reason.",
                &["outcome", "reason"],
            ),
            history_recovered_messages: counter(
                r,
                "history_recovered_messages_total",
                "Messages replayed to clients by recoveries.",
            ),
            client_publishes: counter_vec(
                r,
                "client_publishes_total",
                "Messages clients published with the publish op, by outcome.",
                &["outcome"],
            ),
            history_fetch: {
                let metric = Histogram::with_opts(
                    HistogramOpts::new(
                        "history_fetch_seconds",
                        "Reads of a history channel's stream: fills, joins and periodic checks.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                )
                .expect("valid metric");
                r.register(Box::new(metric.clone()))
                    .expect("metric registered once");
                metric
            },
            registry,
        };
        let metrics = Metrics {
            inner: Arc::new(inner),
        };
        metrics.initialise_series();
        metrics
    }

    /// Creates every series whose label values are known in advance, at 0,
    /// so that dashboards and alerts see them before the first event (an
    /// absent series is not a zero to PromQL's `rate`).
    fn initialise_series(&self) {
        let inner = &self.inner;
        for code in CloseCode::ALL {
            inner.disconnects.with_label_values(&[code.reason()]);
        }
        for reason in ["client_closed", "connection_lost", "internal_error"] {
            inner.disconnects.with_label_values(&[reason]);
        }
        for reason in REJECTION_REASONS {
            inner.connections_rejected.with_label_values(&[reason]);
        }
        for code in AuthError::CODES {
            inner.auth_failures.with_label_values(&[code]);
        }
        for code in ErrorCode::ALL {
            inner.client_errors.with_label_values(&[code.as_str()]);
        }
        for reason in HTTP_CONNECTION_ERRORS {
            inner.http_connection_errors.with_label_values(&[reason]);
        }
        for failure in crate::transport::tls::HandshakeFailure::ALL {
            inner
                .tls_handshake_failures
                .with_label_values(&[failure.reason()]);
        }
        for result in ["ok", "error"] {
            inner.tls_reloads.with_label_values(&[result]);
        }
        for outcome in PUBLISH_OUTCOMES {
            inner.client_publishes.with_label_values(&[outcome]);
        }
        inner
            .history_recoveries
            .with_label_values(&["recovered", "none"]);
        for reason in Unrecoverable::ALL {
            inner
                .history_recoveries
                .with_label_values(&["failed", reason.as_str()]);
        }
    }

    /// The text exposition format for `GET /metrics`.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    pub fn connection_opened(&self) {
        self.inner.connections_accepted.inc();
        self.inner.connections_open.inc();
    }

    /// `reason` is a [`crate::protocol::CloseCode::reason`], `client_closed` or `connection_lost`.
    pub fn connection_closed(&self, reason: &str) {
        self.inner.connections_open.dec();
        self.inner.disconnects.with_label_values(&[reason]).inc();
    }

    pub fn connection_rejected(&self, reason: &str) {
        self.inner
            .connections_rejected
            .with_label_values(&[reason])
            .inc();
    }

    pub fn auth_failed(&self, error: &AuthError) {
        self.inner
            .auth_failures
            .with_label_values(&[error.code()])
            .inc();
    }

    pub fn subscriptions_changed(&self, delta: i64) {
        self.inner.subscriptions.add(delta);
    }

    pub fn channels_changed(&self, delta: i64) {
        self.inner.channels.add(delta);
    }

    pub fn message_published(&self) {
        self.inner.messages_published.inc();
    }

    pub fn message_received(&self) {
        self.inner.messages_received.inc();
    }

    pub fn frames_delivered(&self, count: u64) {
        self.inner.frames_delivered.inc_by(count);
    }

    /// A message a subscriber will not get. `reason` is `queue_full`,
    /// `conflated` or `rate_limited` (counted per subscriber), or `too_large`
    /// (counted once per message).
    pub fn message_dropped(&self, reason: &str, policy: Option<SlowPolicy>) {
        let policy_index = match policy {
            Some(SlowPolicy::Disconnect) => 0,
            Some(SlowPolicy::DropOldest) => 1,
            Some(SlowPolicy::Conflate) => 2,
            None => 3,
        };
        // The fan-out path drops per subscriber: the counters are resolved
        // once, at startup, instead of a label lookup per drop.
        match DROP_REASONS.iter().position(|known| *known == reason) {
            Some(reason_index) => self.inner.drops[reason_index][policy_index].inc(),
            None => self
                .inner
                .messages_dropped
                .with_label_values(&[reason, DROP_POLICIES[policy_index]])
                .inc(),
        }
    }

    pub fn client_error(&self, code: ErrorCode) {
        self.inner
            .client_errors
            .with_label_values(&[code.as_str()])
            .inc();
    }

    pub fn http_request(&self, route: &str, status: u16) {
        self.inner
            .http_requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    pub fn http_connection_error(&self, reason: &str) {
        self.inner
            .http_connection_errors
            .with_label_values(&[reason])
            .inc();
    }

    pub fn broker_connected(&self, connected: bool) {
        self.inner.broker_connected.set(i64::from(connected));
    }

    /// A reconnection that resubscribed `channels` channels.
    pub fn broker_reconnected(&self, channels: u64) {
        self.inner.broker_reconnects.inc();
        self.inner.broker_resubscribed_channels.inc_by(channels);
    }

    pub fn gap_notices(&self, count: u64) {
        self.inner.gap_notices.inc_by(count);
    }

    pub fn broker_probe_failed(&self) {
        self.inner.broker_probe_failures.inc();
    }

    /// Every link's state changed: `up` of `total` links are connected.
    /// `herald_broker_connected` is 1 only when all of them are.
    pub fn broker_links(&self, up: i64, total: i64) {
        self.inner.broker_links.set(total);
        self.inner.broker_links_up.set(up);
        self.inner
            .broker_connected
            .set(i64::from(total > 0 && up == total));
    }

    pub fn broker_unsolicited_unsubscribe(&self) {
        self.inner.broker_unsolicited_unsubscribes.inc();
    }

    pub fn tls_handshake_failed(&self, reason: &str) {
        self.inner
            .tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
    }

    pub fn tls_handshake_started(&self) {
        self.inner.tls_handshakes_in_progress.inc();
    }

    pub fn tls_handshake_ended(&self) {
        self.inner.tls_handshakes_in_progress.dec();
    }

    pub fn tls_reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inner.tls_reloads.with_label_values(&[result]).inc();
    }

    pub fn broker_stale_push(&self) {
        self.inner.broker_stale_pushes.inc();
    }

    pub fn broker_roundtrip(&self, elapsed: Duration) {
        self.inner.broker_roundtrip.observe(elapsed.as_secs_f64());
    }

    /// A fetch of `auth.jwks_url` ended; `keys` is the new set's size when
    /// `outcome` is `ok`.
    pub fn jwks_fetched(&self, trigger: &str, outcome: &str, keys: usize) {
        self.inner
            .jwks_fetches
            .with_label_values(&[trigger, outcome])
            .inc();
        if outcome == "ok" {
            self.inner.jwks_keys.set(keys as i64);
            self.inner
                .jwks_last_success
                .set(crate::auth::unix_now() as i64);
        }
    }

    pub fn broker_function_load_failed(&self) {
        self.inner.broker_function_load_failures.inc();
    }

    /// A client's publish: `None` when it was taken, else the error code.
    pub fn client_publish(&self, error: Option<ErrorCode>) {
        let outcome = error.map_or("ok", ErrorCode::as_str);
        self.inner
            .client_publishes
            .with_label_values(&[outcome])
            .inc();
    }

    pub fn message_unsequenced(&self) {
        self.inner.messages_unsequenced.inc();
    }

    pub fn history_duplicates(&self, count: u64) {
        self.inner.history_duplicates.inc_by(count);
    }

    pub fn history_buffer_overflowed(&self, count: u64) {
        self.inner.history_buffer_overflows.inc_by(count);
    }

    pub fn history_filled(&self, count: u64) {
        self.inner.history_filled.inc_by(count);
    }

    /// A recovery: `None` when it succeeded, else why not.
    pub fn history_recovery(&self, failure: Option<Unrecoverable>) {
        let labels = match failure {
            None => ["recovered", "none"],
            Some(reason) => ["failed", reason.as_str()],
        };
        self.inner
            .history_recoveries
            .with_label_values(&labels)
            .inc();
    }

    pub fn history_recovered_messages(&self, count: u64) {
        self.inner.history_recovered_messages.inc_by(count);
    }

    pub fn history_fetch(&self, elapsed: Duration) {
        self.inner.history_fetch.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_exist_before_their_first_event() {
        let text = Metrics::new("n").render();
        for (name, labels) in [
            (
                "herald_disconnects_total",
                &["reason=\"slow_consumer\""][..],
            ),
            ("herald_disconnects_total", &["reason=\"client_closed\""]),
            (
                "herald_connections_rejected_total",
                &["reason=\"connection_rate_per_ip\""],
            ),
            (
                "herald_messages_dropped_total",
                &["policy=\"conflate\"", "reason=\"conflated\""],
            ),
            ("herald_auth_failures_total", &["reason=\"bad_signature\""]),
            ("herald_client_errors_total", &["code=\"limit_exceeded\""]),
            (
                "herald_http_connection_errors_total",
                &["reason=\"idle_timeout\""],
            ),
        ] {
            let found = text.lines().any(|line| {
                line.starts_with(&format!("{name}{{"))
                    && labels.iter().all(|label| line.contains(label))
                    && line.ends_with(" 0")
            });
            assert!(found, "{name} {labels:?} missing from\n{text}");
        }
    }
}
