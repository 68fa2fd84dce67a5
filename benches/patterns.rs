//! Pattern subscriptions: the cost of finding who a message goes to among
//! 10,000 distinct pattern subscriptions, with the hub's prefix index against
//! scanning every pattern.
//!
//! `cargo bench --bench patterns`

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use herald::channel::Pattern;
use herald::config::Config;
use herald::hub::Hub;
use herald::metrics::Metrics;
use herald::session::outbox::{Outbox, QueueLimits};

const PATTERNS: usize = 10_000;
const PAYLOAD: &[u8] = br#"{"price":187.21}"#;

fn outbox() -> Arc<Outbox> {
    Arc::new(Outbox::new(
        QueueLimits {
            messages: 1 << 20,
            bytes: 1 << 30,
        },
        u64::MAX,
        Metrics::new("bench"),
    ))
}

/// 10,000 distinct patterns in the shapes clients use: per-user inboxes
/// (`user.<n>.*`), per-symbol feeds (`prices.<n>.*`), and a few with the
/// wildcard in the middle (`orders.*.<n>`).
fn patterns() -> Vec<Pattern> {
    (0..PATTERNS)
        .map(|i| match i % 10 {
            0..=5 => format!("user.{i}.*"),
            6..=8 => format!("prices.{i}.*"),
            _ => format!("orders.*.{i}"),
        })
        .map(|text| Pattern::parse(&text).unwrap())
        .collect()
}

fn lookup(c: &mut Criterion) {
    let patterns = patterns();
    let hub = Hub::new(&Config::default(), Metrics::new("bench"), false);
    let outboxes: Vec<Arc<Outbox>> = (0..PATTERNS).map(|_| outbox()).collect();
    for (i, pattern) in patterns.iter().enumerate() {
        hub.subscribe_pattern(i as u64, &outboxes[i], pattern);
    }
    let mut group = c.benchmark_group("patterns_10000");
    // Each channel, with the one subscription it matches (drained so that
    // its queue stays small).
    for (channel, matched) in [
        ("user.4242.inbox", 4242),
        ("orders.eu.9999", 9999),
        ("nomatch.channel", 0),
    ] {
        group.bench_with_input(
            BenchmarkId::new("hub_deliver_patterns", channel),
            channel,
            |b, channel| {
                b.iter(|| {
                    let delivered = hub.deliver_patterns(channel, PAYLOAD, None);
                    // Keep the queues from growing without bound.
                    if delivered > 0 {
                        let mut frames = Vec::new();
                        outboxes[matched].drain(
                            &mut frames,
                            usize::MAX,
                            tokio::time::Instant::now(),
                        );
                    }
                    delivered
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("scan_every_pattern", channel),
            channel,
            |b, channel| b.iter(|| patterns.iter().filter(|p| p.matches(channel)).count()),
        );
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
