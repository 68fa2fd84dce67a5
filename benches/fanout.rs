//! Micro-benchmarks of the fan-out path: encoding, outbox push and drain, and
//! hub delivery to 1, 1,000 and 10,000 subscribers, plus how long a subscribe
//! waits while a 10,000-subscriber delivery runs on another thread, and what
//! a connection's writer spends framing and writing one batch. They guide the
//! work; BENCHMARKS.md's end-to-end figures judge it.
//!
//! `cargo bench --bench fanout`

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use herald::config::{Config, SlowPolicy};
use herald::hub::Hub;
use herald::metrics::Metrics;
use herald::protocol::Opcode;
use herald::session::outbox::{DeliveryPolicy, Outbox, QueueLimits};
use herald::session::write_batch::WriteBatch;

const PAYLOAD: &[u8] = br#"{"symbol":"AAPL","price":187.21,"volume":1200,"ts":1700000000123}"#;

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

fn encode(c: &mut Criterion) {
    c.bench_function("encode_message", |b| {
        b.iter(|| herald::protocol::encode_message("prices.AAPL", std::hint::black_box(PAYLOAD)))
    });
}

fn outbox_push_and_drain(c: &mut Criterion) {
    let outbox = outbox();
    let frame = herald::protocol::encode_message("prices.AAPL", PAYLOAD);
    let policy = DeliveryPolicy::default();
    let mut frames = Vec::new();
    c.bench_function("outbox_push_64_then_drain", |b| {
        b.iter(|| {
            for _ in 0..64 {
                outbox.push_message(&frame, 1, &policy);
            }
            frames.clear();
            outbox.drain(&mut frames, usize::MAX, tokio::time::Instant::now());
        })
    });
    let conflate = DeliveryPolicy {
        slow: SlowPolicy::Conflate,
        min_interval: None,
    };
    c.bench_function("outbox_conflate_into_64_channels", |b| {
        b.iter(|| {
            for channel in 0..64 {
                outbox.push_message(&frame, channel, &conflate);
                outbox.push_message(&frame, channel, &conflate);
            }
            frames.clear();
            outbox.drain(&mut frames, usize::MAX, tokio::time::Instant::now());
        })
    });
}

/// Conflation behind a backlog: 1,000 entries are queued (a slow reader),
/// then 64 channels each get two messages, the second replacing the first.
fn conflate_behind_a_backlog(c: &mut Criterion) {
    let outbox = outbox();
    let frame = herald::protocol::encode_message("prices.AAPL", PAYLOAD);
    let conflate = DeliveryPolicy {
        slow: SlowPolicy::Conflate,
        min_interval: None,
    };
    let mut frames = Vec::new();
    c.bench_function("outbox_conflate_behind_1000_queued", |b| {
        b.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            for _ in 0..iterations {
                for _ in 0..1000 {
                    outbox.push_reply(frame.clone());
                }
                let started = Instant::now();
                for channel in 0..64 {
                    outbox.push_message(&frame, channel, &conflate);
                    outbox.push_message(&frame, channel, &conflate);
                }
                spent += started.elapsed();
                frames.clear();
                outbox.drain(&mut frames, usize::MAX, tokio::time::Instant::now());
            }
            spent
        })
    });
}

/// A hub with `subscribers` outboxes on one channel.
fn hub_with(config: &Config, subscribers: usize) -> (Hub, Vec<Arc<Outbox>>) {
    let hub = Hub::new(config, Metrics::new("bench"), false);
    let outboxes: Vec<Arc<Outbox>> = (0..subscribers).map(|_| outbox()).collect();
    for (id, outbox) in outboxes.iter().enumerate() {
        hub.subscribe(id as u64, outbox, "prices.AAPL");
    }
    (hub, outboxes)
}

/// Times `iterations` deliveries, draining every outbox after each
/// `drain_every` of them, as the writers would, outside the timed part.
fn timed_deliveries(
    hub: &Hub,
    outboxes: &[Arc<Outbox>],
    iterations: u64,
    drain_every: u64,
) -> Duration {
    let mut spent = Duration::ZERO;
    let mut frames = Vec::new();
    for done in 0..iterations {
        let started = Instant::now();
        hub.deliver("prices.AAPL", PAYLOAD);
        spent += started.elapsed();
        if done % drain_every == drain_every - 1 {
            for outbox in outboxes {
                frames.clear();
                outbox.drain(&mut frames, usize::MAX, tokio::time::Instant::now());
            }
        }
    }
    spent
}

fn hub_deliver(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub_deliver");
    for subscribers in [1usize, 1_000, 10_000] {
        let (hub, outboxes) = hub_with(&Config::default(), subscribers);
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| b.iter_custom(|iterations| timed_deliveries(&hub, &outboxes, iterations, 64)),
        );
    }
    group.finish();
}

/// One delivery to 10,000 subscribers' outboxes with `server.fanout_threads`
/// 1 and 2: the parallel fan-out's speed-up (issue 13 asks at least 1.6x on
/// two threads).
fn hub_deliver_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub_deliver_10k_threads");
    for threads in [1usize, 2] {
        let mut config = Config::default();
        config.server.fanout_threads = threads;
        let (hub, outboxes) = hub_with(&config, 10_000);
        group.throughput(criterion::Throughput::Elements(10_000));
        group.bench_with_input(BenchmarkId::from_parameter(threads), &threads, |b, _| {
            b.iter_custom(|iterations| timed_deliveries(&hub, &outboxes, iterations, 8))
        });
    }
    group.finish();
}

/// A subscribe to, and unsubscribe from, a channel while 10,000-subscriber
/// deliveries to that same channel run back to back on another thread.
fn subscribe_during_fanout(c: &mut Criterion) {
    let hub = Hub::new(&Config::default(), Metrics::new("bench"), false);
    let outboxes: Vec<Arc<Outbox>> = (0..10_000).map(|_| outbox()).collect();
    for (id, outbox) in outboxes.iter().enumerate() {
        hub.subscribe(id as u64, outbox, "busy");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let fanout = {
        let hub = hub.clone();
        let stop = stop.clone();
        let outboxes = outboxes.clone();
        std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                hub.deliver("busy", PAYLOAD);
                round += 1;
                if round % 32 == 0 {
                    for outbox in &outboxes {
                        frames.clear();
                        outbox.drain(&mut frames, usize::MAX, tokio::time::Instant::now());
                    }
                }
            }
        })
    };
    let newcomer = outbox();
    let mut id = 1_000_000u64;
    c.bench_function("subscribe_during_10k_fanout", |b| {
        b.iter(|| {
            id += 1;
            hub.subscribe(id, &newcomer, "busy");
            hub.unsubscribe(id, "busy");
        })
    });
    stop.store(true, Ordering::Relaxed);
    fanout.join().unwrap();
}

/// Writes all of `batch`, vectored or made contiguous first (what the writer
/// does for transports that do not write vectored, and what it did for every
/// transport before), then clears it for the next batch.
fn write_batch(out: &mut impl Write, batch: &mut WriteBatch, vectored: bool) {
    if !vectored {
        batch.make_contiguous();
    }
    while !batch.is_done() {
        let mut slices = [IoSlice::new(&[]); 64];
        let used = batch.io_slices(&mut slices);
        let written = out.write_vectored(&slices[..used]).unwrap();
        batch.advance(written);
    }
    // Between messages a writer waits, and frees its buffers first.
    batch.release();
}

/// One writer pass: `count` messages of `size` bytes (shared, as the hub
/// shares them) framed into a batch and written, to `io::sink()` (the
/// user-space cost alone) and to a loopback TCP socket that a thread drains
/// (what a pass costs the node).
fn writer_batches(c: &mut Criterion) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut reader = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut socket, _) = listener.accept().unwrap();
    socket.set_nodelay(true).unwrap();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 256 * 1024];
        while reader.read(&mut buffer).is_ok_and(|n| n > 0) {}
    });
    let mut batch = WriteBatch::default();
    for (sink, name) in [(true, "writer_batch_sink"), (false, "writer_batch_socket")] {
        let mut group = c.benchmark_group(name);
        for (count, size) in [
            (1, 100),
            (1, 1024),
            (1, 4096),
            (1, 16384),
            (8, 100),
            (8, 4096),
        ] {
            let payload = Bytes::from(vec![b'x'; size]);
            for (vectored, how) in [(false, "copied"), (true, "vectored")] {
                let id = BenchmarkId::new(how, format!("{count}x{size}"));
                group.bench_function(id, |b| {
                    b.iter(|| {
                        for _ in 0..count {
                            batch.push(Opcode::Text, payload.clone());
                        }
                        if sink {
                            write_batch(&mut std::io::sink(), &mut batch, vectored);
                        } else {
                            write_batch(&mut socket, &mut batch, vectored);
                        }
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = encode, outbox_push_and_drain, conflate_behind_a_backlog, hub_deliver, hub_deliver_threads, subscribe_during_fanout, writer_batches
}
criterion_main!(benches);
