#!/usr/bin/env bash
# Reproduces one figure of BENCHMARKS.md per invocation:
#
#   loadtest/bench.sh memory|handshakes|fanout-1k|cpu-100k|fanout-10k|fanout-10k-redis|slow|storm|100k [RATE...]
#   loadtest/bench.sh faults-redis-kill|faults-client-kill|faults-redis-pause|faults-sigterm|
#                     faults-slow-attack|faults-leaks|drain|faults-ci|faults
#   loadtest/bench.sh history-kills|history-resume|history-publish|history-cpu [RATE...]|history-ci|history
#   loadtest/bench.sh tls
#   loadtest/bench.sh floor|floor-sweep [RATE...]
#   loadtest/bench.sh profile
#
# TLS=1 before any scenario serves it over wss:// with a self-signed
# certificate (the tool trusts it with --ca-file); scenarios that publish
# through the HTTP API need plain http, so the tls scenario publishes
# through Redis.
#
# The faults-* scenarios, drain, history-kills and history-resume assert
# their outcome: the tool exits 1 when a check fails, and so does this script.
#
# Release builds of herald and herald-loadtest are made first. Gateway nodes
# are pinned to core 0 (taskset -c 0); the load tester and Redis to core 1.
# Every process it starts is stopped when it exits. JSON summaries go to
# bench-results/ (override with OUT=dir).
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY_CORE=${GATEWAY_CORE:-0}
TOOL_CORE=${TOOL_CORE:-1}
OUT=${OUT:-bench-results}
SECRET=bench-secret-0123456789abcdef0123456789
KEY=bench-api-key-0123456789
mkdir -p "$OUT"

cargo build --release -q -p herald -p herald-loadtest
# HERALD=path runs another build of herald (an older commit, say) instead.
HERALD=${HERALD:-target/release/herald}
TOOL=target/release/herald-loadtest
FLOOR=target/release/herald-floor

PIDS=()
# A Redis restarted by a fault writes its pid here (it runs daemonized).
RESTARTED_REDIS_PIDFILE=$(mktemp -u /tmp/herald-bench-redis-XXXXXX.pid)
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -f "$RESTARTED_REDIS_PIDFILE" ]; then
        kill "$(cat "$RESTARTED_REDIS_PIDFILE")" 2>/dev/null || true
        rm -f "$RESTARTED_REDIS_PIDFILE"
    fi
    [ -n "${TLS_DIR:-}" ] && rm -rf "$TLS_DIR"
    wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# With TLS=1: a self-signed certificate for 127.0.0.1 and localhost.
TLS_DIR=""
tls_certificate() {
    if [ -z "$TLS_DIR" ]; then
        TLS_DIR=$(mktemp -d /tmp/herald-bench-tls-XXXXXX)
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
            -addext basicConstraints=critical,CA:FALSE \
            -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" 2>/dev/null
    fi
}

wait_ready() {
    local scheme=http
    [ -n "${TLS:-}" ] && scheme=https
    for _ in $(seq 1 200); do
        if curl -kfsS "$scheme://127.0.0.1:$1/readyz" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "node on port $1 never became ready" >&2
    return 1
}

# start_redis: sets REDIS_PORT and REDIS_PID.
start_redis() {
    REDIS_PORT=$(free_port)
    taskset -c "$TOOL_CORE" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --loglevel warning >/dev/null &
    REDIS_PID=$!
    PIDS+=($!)
    for _ in $(seq 1 100); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "redis did not start" >&2
    return 1
}

# start_node BROKER [VAR=VALUE...]: starts one node with extra environment;
# sets NODE_PID, NODE_PORT, and appends to URLS, PIDFLAGS, PORTS.
start_node() {
    local broker=$1
    shift
    local port
    port=$(free_port)
    local env=(HERALD_AUTH__HMAC_SECRET=$SECRET HERALD_API__KEY=$KEY HERALD_NODE__ID=bench$((${#PORTS[@]} + 1))
        HERALD_SERVER__LISTEN=127.0.0.1:$port HERALD_LOG__LEVEL=${LOG_LEVEL:-warn}
        HERALD_LIMITS__CONNECTION_RATE=100000 HERALD_LIMITS__CONNECTION_BURST=100000
        HERALD_LIMITS__CONNECTION_RATE_PER_IP=0 HERALD_SERVER__MAX_HTTP_CONNECTIONS=20000
        HERALD_SHUTDOWN__DRAIN_PERIOD=${DRAIN_PERIOD:-0s})
    if [ "$broker" = redis ]; then
        env+=(HERALD_BROKER__KIND=redis HERALD_BROKER__URL=redis://127.0.0.1:$REDIS_PORT)
    fi
    local scheme=ws
    if [ -n "${TLS:-}" ]; then
        tls_certificate
        env+=(HERALD_SERVER__TLS__CERT_FILE=$TLS_DIR/cert.pem HERALD_SERVER__TLS__KEY_FILE=$TLS_DIR/key.pem
            HERALD_SERVER__TLS__MAX_HANDSHAKES=20000)
        scheme=wss
    fi
    # NODE_CONFIG: a TOML file for what the environment cannot say ([[channels]]).
    env "${env[@]}" "$@" taskset -c "$GATEWAY_CORE" "$HERALD" serve ${NODE_CONFIG:+--config "$NODE_CONFIG"} &
    NODE_PID=$!
    NODE_PORT=$port
    PIDS+=($!)
    PIDFLAGS+=(--pid $!)
    URLS+=(--url $scheme://127.0.0.1:$port/ws)
    [ -n "${TLS:-}" ] && URLS+=(--ca-file "$TLS_DIR/cert.pem")
    PORTS+=("$port")
}

# start_nodes COUNT [BROKER]: sets URLS (--url flags), PIDFLAGS (--pid flags), PORTS.
start_nodes() {
    local count=$1 broker=${2:-memory}
    URLS=() PIDFLAGS=() PORTS=()
    for _ in $(seq 1 "$count"); do start_node "$broker"; done
    for port in "${PORTS[@]}"; do wait_ready "$port"; done
}

# stop_all: stops every process started so far (between repeated runs).
stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

# stop_all_nodes: stops the nodes started by the last start_nodes, not Redis.
stop_all_nodes() {
    local pid
    for pid in "${PIDFLAGS[@]}"; do
        [ "$pid" = --pid ] && continue
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# still_up PID: fails (and says so) unless the process still runs.
still_up() {
    if kill -0 "$1" 2>/dev/null; then
        echo "node $1 is still up"
    else
        echo "node $1 is gone" >&2
        return 1
    fi
}

tool() {
    ulimit -n 20000
    taskset -c "$TOOL_CORE" "$TOOL" "$@"
}

api() {
    echo --publish api --api-url "http://127.0.0.1:${PORTS[0]}/api/publish" --api-key "$KEY"
}

metrics() {
    for port in "$@"; do echo --metrics-url "http://127.0.0.1:$port/metrics"; done
}

# The Redis fault scenarios' load: 1,000 subscribers over 10 channels on one
# node, 1,000 messages/s published through Redis (100,000 deliveries/s).
redis_fault_load() {
    echo --secret $SECRET "${PIDFLAGS[@]}" "${URLS[@]}" --source-ips 2 \
        --publish redis --redis-url redis://127.0.0.1:$REDIS_PORT \
        --subscribers 1000 --channels 10 --payload 100 $(metrics "${PORTS[0]}")
}

# history_config: writes the history channels' configuration, history on
# every fanout.* channel, and prints its path (for NODE_CONFIG).
history_config() {
    local file="$OUT/history-channels.toml"
    cat >"$file" <<'TOML'
[[channels]]
pattern = "fanout.*"
history_size = 10000
history_ttl = "10m"
recover_max = 1000
TOML
    echo "$file"
}

# The history scenarios' load: 1,000 subscribers over 10 channels, 1,000
# messages/s published with FCALL herald_publish (100,000 deliveries/s),
# every delivery accounted by offset.
history_load() {
    echo --secret $SECRET "${PIDFLAGS[@]}" "${URLS[@]}" --source-ips 2 \
        --publish function --redis-url redis://127.0.0.1:$REDIS_PORT --history \
        --subscribers 1000 --channels 10 --payload 100 --rate 1000 $(metrics "${PORTS[@]}")
}

# start_server herald|floor: one herald node, or herald-floor, on the
# gateway core; sets URLS, PIDFLAGS and PORTS as start_nodes does.
start_server() {
    if [ "$1" = herald ]; then
        start_nodes 1
        return
    fi
    local port
    port=$(free_port)
    taskset -c "$GATEWAY_CORE" "$FLOOR" --listen 127.0.0.1:$port 2>/dev/null &
    PIDS+=($!)
    URLS=(--url ws://127.0.0.1:$port/ws) PIDFLAGS=(--pid $!) PORTS=("$port")
    wait_ready "$port"
}

# floor_load SUBSCRIBERS: the floor comparisons' load on the server
# start_server started: SUBSCRIBERS on one channel (more than 1,000 from two
# source addresses), 100-byte payloads through its HTTP API.
floor_load() {
    echo "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) \
        --subscribers "$1" --channels 1 --payload 100
    if [ "$1" -gt 1000 ]; then echo --source-ips 2 --connect-rate 5000; fi
}

# median FILE... -- JSONPATH: the median of one numeric field over summaries.
median() {
    python3 - "$@" <<'PY'
import json, statistics, sys
args = sys.argv[1:]
split = args.index("--")
files, path = args[:split], args[split + 1]
values = []
for name in files:
    value = json.load(open(name))
    for key in path.split("."):
        value = value[key]
    values.append(value)
print(statistics.median(values))
PY
}

scenario=${1:?usage: bench.sh SCENARIO [RATES...]}
shift || true
RATES=("$@")
rates() { if [ ${#RATES[@]} -eq 0 ]; then echo "$@"; else echo "${RATES[@]}"; fi; }

# sample LABEL: one line per gateway, Redis and load-tester process: RSS and CPU ticks.
sample() {
    for pid in $(pgrep -f "$HERALD serve") $(pgrep -f "redis-server.*:${REDIS_PORT:-none}") $(pgrep -f "herald-loadtest"); do
        [ -r /proc/$pid/stat ] || continue
        echo "$1 $pid $(awk '/VmRSS/ {print $2}' /proc/$pid/status) $(awk '{print $14 + $15}' /proc/$pid/stat) $(tr '\0' ' ' </proc/$pid/cmdline | cut -c1-60)"
    done
}

case "$scenario" in
memory)
    # Figure 1: memory per idle subscribed connection at 10k connections,
    # CHANNELS_PER_CONN channels each (default 1).
    start_nodes 1
    tool connect "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --source-ips 2 \
        --connections 10000 --rate 2000 --channels-per-conn "${CHANNELS_PER_CONN:-1}" --channel-count 100 --hold 5s \
        --json "$OUT/memory.json"
    ;;
handshakes)
    # Figure 4: handshakes per second on one node (HS256 JWT + subscribe).
    start_nodes 1
    tool connect "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --source-ips 2 \
        --connections 15000 --rate "$(rates 10000)" --channels-per-conn 1 --channel-count 100 --hold 1s \
        --json "$OUT/handshakes.json"
    ;;
fanout-1k)
    # Figure 3 / target: highest delivery rate to 1k subscribers, p99 <= 50 ms, zero loss.
    start_nodes 1
    for rate in $(rates 100 200 300 400); do
        tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) \
            --subscribers 1000 --channels 1 --rate "$rate" --payload 100 --duration 10s \
            --json "$OUT/fanout-1k-$rate.json"
    done
    ;;
cpu-100k)
    # Target: server CPU per delivery at 100k deliveries/s (1k subscribers x
    # 100/s); PAYLOAD bytes (default 100).
    start_nodes 1
    tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) \
        --subscribers 1000 --channels 1 --rate 100 --payload "${PAYLOAD:-100}" --duration 20s \
        --json "$OUT/cpu-100k.json"
    ;;
fanout-10k)
    # Figure 3: 1 channel to 10k subscribers, 100-byte payloads, one node.
    start_nodes 1
    for rate in $(rates 3 10 20 40); do
        tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) --source-ips 2 \
            --subscribers 10000 --connect-rate 5000 --channels 1 --rate "$rate" --payload 100 --duration 10s \
            --json "$OUT/fanout-10k-$rate.json"
    done
    ;;
fanout-10k-redis)
    # Figure 3: the same over Redis with 4 nodes (all on the gateway core).
    start_redis
    start_nodes 4 redis
    for rate in $(rates 3 10 20 40); do
        tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --source-ips 2 \
            --publish redis --redis-url redis://127.0.0.1:$REDIS_PORT \
            --subscribers 10000 --connect-rate 5000 --channels 1 --rate "$rate" --payload 100 --duration 10s \
            --json "$OUT/fanout-10k-redis-$rate.json"
    done
    ;;
slow)
    # Healthy subscribers' latency while 10% of them stop reading. Each slow
    # subscriber falls 16 MB behind, more than loopback's socket buffers hold,
    # so herald's own queue fills and the slow-consumer policy acts.
    start_nodes 1
    tool slow "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) \
        --subscribers 200 --channels 1 --rate 100 --payload 16000 --duration 10s --slow-fraction 0.1 \
        --json "$OUT/slow.json"
    ;;
storm)
    # Figure 5: a reconnect storm of 20k connections.
    start_nodes 2
    tool storm "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --workers 2 --source-ips 4 \
        --connections 20000 --drop 20000 --channels-per-conn 1 --connect-rate 5000 --attempts 5 \
        --json "$OUT/storm.json"
    ;;
100k)
    # Figure 2: 100k connections over 6 nodes and one Redis, held for HOLD
    # (default 5m). NODES=12 CONNECTIONS=200000 gives issue 13's 200k (each
    # node and each tool worker stays under 20,000 open files).
    start_redis
    NODES=${NODES:-6}
    start_nodes "$NODES" redis
    HOLD=${HOLD:-5m}
    tool connect "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --workers "$NODES" --source-ips $((NODES * 4)) \
        --connections "${CONNECTIONS:-100000}" --rate 5000 --channels-per-conn 1 --channel-count 1000 --hold "$HOLD" \
        --json "$OUT/100k.json" &
    TOOL_PID=$!
    # Sample every part once all are connected and again before the end; the
    # CPU difference is what holding 100k connections with pings costs.
    HOLD_SECONDS=$(python3 -c "import re,sys; v='$HOLD'; n=float(re.sub('[a-z]','',v)); print(int(n*60 if v.endswith('m') else n))")
    sleep $((${CONNECTIONS:-100000} / 5000 + 20))
    sample start >"$OUT/100k-samples.txt"
    grep -E 'Slab|MemAvailable|MemFree' /proc/meminfo | sed 's/^/start /' >>"$OUT/100k-samples.txt"
    sleep $((HOLD_SECONDS - ${CONNECTIONS:-100000} / 5000 - 10))
    sample end >>"$OUT/100k-samples.txt"
    grep -E 'Slab|MemAvailable|MemFree' /proc/meminfo | sed 's/^/end /' >>"$OUT/100k-samples.txt"
    cat "$OUT/100k-samples.txt"
    wait $TOOL_PID
    ;;
faults-redis-kill)
    # Redis SIGKILLed 5 s into the measurement and restarted 3 s later. The
    # node must stay up and resubscribe; every subscriber gets a gap; what
    # each lost is exactly what was published while no node was subscribed.
    start_redis
    start_nodes 1 redis
    restart="taskset -c $TOOL_CORE redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no"
    restart+=" --loglevel warning --daemonize yes --pidfile $RESTARTED_REDIS_PIDFILE"
    tool fanout $(redis_fault_load) --rate 1000 --duration 15s \
        --fault-exec "5s=kill -9 $REDIS_PID" --fault-exec "8s=$restart" \
        --check loss-only-in-outage --check loss-announced --check gap-every-subscriber --check no-disconnects \
        --expect-metric 'increase(herald_broker_reconnects_total)>=1' \
        --expect-metric 'increase(herald_broker_stale_pushes_total)==0' \
        --expect-metric 'herald_connections_open==1000' \
        --json "$OUT/faults-redis-kill.json"
    still_up "$NODE_PID"
    ;;
faults-client-kill)
    # CLIENT KILL TYPE pubsub every 2 s for 30 s: loss only around the kills,
    # a gap after each, the node and its clients stay up.
    start_redis
    start_nodes 1 redis
    tool fanout $(redis_fault_load) --rate 1000 --duration 30s --kill-pubsub-every 2s \
        --check loss-only-in-outage --check loss-announced --check gap-per-kill --check no-disconnects \
        --expect-metric 'increase(herald_broker_reconnects_total)>=14' \
        --expect-metric 'increase(herald_broker_stale_pushes_total)==0' \
        --expect-metric 'herald_connections_open==1000' \
        --json "$OUT/faults-client-kill.json"
    still_up "$NODE_PID"
    ;;
faults-redis-pause)
    # CLIENT PAUSE 10 s (ALL), longer than the probe interval (5 s) plus its
    # timeout (3 s): the probe detects it, the node reconnects, every
    # subscriber gets a gap and every loss is announced.
    start_redis
    start_nodes 1 redis
    tool fanout $(redis_fault_load) --rate 500 --duration 20s \
        --fault-exec "5s=redis-cli -p $REDIS_PORT client pause 10000 all" \
        --check loss-only-in-outage --check loss-announced --check gap-every-subscriber --check no-disconnects \
        --expect-metric 'increase(herald_broker_probe_failures_total)>=1' \
        --expect-metric 'increase(herald_broker_reconnects_total)>=1' \
        --expect-metric 'herald_connections_open==1000' \
        --json "$OUT/faults-redis-pause.json"
    still_up "$NODE_PID"
    ;;
faults-sigterm)
    # SIGTERM at 300,000 deliveries/s (1,000 subscribers x 300/s, memory
    # broker), with shutdown.drain_period 0s and with the default 20 s: all
    # that was queued is flushed before each close, every subscriber gets
    # 1001, and the node exits well before shutdown.timeout (30 s).
    for period in 0s 20s; do
        DRAIN_PERIOD=$period start_nodes 1
        if [ "$period" = 0s ]; then duration=8s; within=5s; else duration=28s; within=25s; fi
        tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) \
            --subscribers 1000 --channels 1 --rate 300 --payload 100 --duration "$duration" \
            --sigterm-at 3s --exit-within "$within" --check flushed-before-close --check closed-1001 \
            --json "$OUT/faults-sigterm-drain-$period.json"
        stop_all
    done
    ;;
faults-slow-attack)
    # Healthy subscribers' latency with 1,000 slowloris sockets and 1,000
    # stalled readers, against a clean run of the same load (1,000
    # subscribers x RATE/s, default 100); REPEAT pairs (default 3),
    # alternating, medians compared: p99 within 20%.
    start_nodes 1
    load=("${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) --source-ips 4
        --subscribers 1000 --channels 1 --rate "$(rates 100)" --payload 100 --duration 15s)
    clean=() attacked=()
    for i in $(seq 1 "${REPEAT:-3}"); do
        tool fanout "${load[@]}" --check lossless --json "$OUT/faults-slow-attack-clean-$i.json"
        clean+=("$OUT/faults-slow-attack-clean-$i.json")
        tool fanout "${load[@]}" --stalled 1000 --slowloris 1000 --slowloris-interval 2s \
            --check lossless --json "$OUT/faults-slow-attack-attacked-$i.json"
        attacked+=("$OUT/faults-slow-attack-attacked-$i.json")
    done
    p99_clean=$(median "${clean[@]}" -- results.latency_ms.p99)
    p99_attacked=$(median "${attacked[@]}" -- results.latency_ms.p99)
    echo "healthy p99, median of ${REPEAT:-3}: clean $p99_clean ms, attacked $p99_attacked ms"
    python3 -c "import sys; c, a = $p99_clean, $p99_attacked; print(f'ratio {a / c:.3f}'); sys.exit(0 if a <= 1.2 * c else 1)"
    ;;
faults-leaks)
    # 200,000 connections in 20 waves of 10,000 over 8 source addresses: RSS
    # within 10% of its level after the first wave, and no open connection
    # or subscription left.
    start_nodes 1
    tool churn "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --source-ips 8 \
        --waves 20 --wave-connections 10000 --rate 8000 --settle 2s --channels-per-conn 1 --channel-count 100 \
        --rss-tolerance 0.10 $(metrics "${PORTS[0]}") \
        --expect-metric 'herald_connections_open==0' --expect-metric 'herald_subscriptions==0' \
        --expect-metric 'increase(herald_connections_accepted_total)==200000' \
        --json "$OUT/faults-leaks.json"
    ;;
drain)
    # Issue 12's paced drain seen from the other nodes: 10,000 clients on
    # node A reconnect to B and C when A is stopped with SIGTERM, with
    # shutdown.drain_period 10s and with 0s (a storm).
    for period in 10s 0s; do
        start_redis
        URLS=() PIDFLAGS=() PORTS=()
        DRAIN_PERIOD=$period start_node redis
        a_pid=$NODE_PID a_port=$NODE_PORT
        start_node redis
        b_port=$NODE_PORT
        start_node redis
        c_port=$NODE_PORT
        for port in "${PORTS[@]}"; do wait_ready "$port"; done
        checks=()
        if [ "$period" = 10s ]; then checks=(--max-window-ratio 3 --exit-within 15s); else checks=(--exit-within 5s); fi
        tool drain --url ws://127.0.0.1:$a_port/ws --secret $SECRET "${PIDFLAGS[@]}" --source-ips 4 \
            --reconnect-url ws://127.0.0.1:$b_port/ws --reconnect-url ws://127.0.0.1:$c_port/ws \
            --signal-pid "$a_pid" --connections 10000 --connect-rate 5000 --attempts 5 "${checks[@]}" \
            $(metrics "$b_port" "$c_port") --expect-metric 'increase(herald_connections_accepted_total)==10000' \
            --json "$OUT/drain-$period.json"
        stop_all
    done
    ;;
faults-ci)
    # The CI-sized Redis-kill, CLIENT KILL and pause faults (loadtest/tests/faults.rs).
    cargo test -q -p herald-loadtest --test faults
    ;;
history-kills)
    # CLIENT KILL TYPE pubsub every 2 s for 30 s on history channels (the
    # load of faults-client-kill, published with herald_publish): the node
    # fills what each kill cost from the streams, so every subscriber gets
    # every offset exactly once, in order, and no gap.
    start_redis
    NODE_CONFIG=$(history_config) start_nodes 1 redis
    tool fanout $(history_load) --duration 30s --kill-pubsub-every 2s \
        --check offsets-exact --check no-gap --check lossless --check no-disconnects \
        --expect-metric 'increase(herald_broker_reconnects_total)>=14' \
        --expect-metric 'increase(herald_gap_notices_total)==0' \
        --expect-metric 'increase(herald_history_filled_messages_total)>0' \
        --expect-metric 'increase(herald_broker_stale_pushes_total)==0' \
        --expect-metric 'herald_connections_open==1000' \
        --json "$OUT/history-kills.json"
    still_up "$NODE_PID"
    ;;
history-resume)
    # Two nodes on one Redis; a tenth of the subscribers disconnect every 2 s
    # and resubscribe with since on the other node: every resume recovers
    # exactly what it missed, and nothing is missing, duplicated or reordered.
    start_redis
    NODE_CONFIG=$(history_config) start_nodes 2 redis
    tool fanout $(history_load) --duration 30s --reconnect-fraction 0.1 --reconnect-every 2s \
        --check offsets-exact --check no-gap --check recovered --check lossless \
        --expect-metric 'increase(herald_history_recoveries_total{outcome="failed"})==0' \
        --expect-metric 'increase(herald_gap_notices_total)==0' \
        --json "$OUT/history-resume.json"
    ;;
history-publish)
    # Publish throughput into Redis, pipelined: FCALL herald_publish against
    # PUBLISH, 100-byte payloads to one channel that one subscriber hears.
    # redis-benchmark (4 connections, 32 commands in flight each) on the
    # gateway core, Redis alone on the other; a herald node loads the
    # function library and stops. REPEAT alternating runs (default 5) of
    # 1,000,000 commands; Redis's own CPU per command from /proc.
    start_redis
    NODE_CONFIG=$(history_config) start_nodes 1 redis
    kill "$NODE_PID"
    wait "$NODE_PID" 2>/dev/null || true
    taskset -c "$GATEWAY_CORE" redis-cli -p "$REDIS_PORT" subscribe fanout.0 >/dev/null &
    PIDS+=($!)
    payload=$(printf 'x%.0s' $(seq 1 100))
    requests=${REQUESTS:-1000000}
    results="$OUT/history-publish.txt"
    : >"$results"
    for i in $(seq 1 "${REPEAT:-5}"); do
        for command in PUBLISH FCALL; do
            if [ "$command" = PUBLISH ]; then args=(PUBLISH fanout.0 "$payload"); else args=(FCALL herald_publish 1 fanout.0 "$payload"); fi
            before=$(awk '{print $14 + $15}' "/proc/$REDIS_PID/stat")
            rate=$(taskset -c "$GATEWAY_CORE" redis-benchmark -p "$REDIS_PORT" -c 4 -P 32 -n "$requests" --csv "${args[@]}" |
                awk -F, 'NR == 2 {gsub(/"/, "", $2); print $2}')
            after=$(awk '{print $14 + $15}' "/proc/$REDIS_PID/stat")
            us=$(python3 -c "print(round(($after - $before) * 10000 / $requests, 3))")
            echo "$command run $i: $rate commands/s, Redis CPU $us us/command" | tee -a "$results"
        done
    done
    python3 - "$results" <<'PY'
import re, statistics, sys
rows = [re.match(r"(\w+) run \d+: ([\d.]+) commands/s, Redis CPU ([\d.]+) us", line).groups() for line in open(sys.argv[1])]
for command in ("PUBLISH", "FCALL"):
    rates = [float(r) for c, r, _ in rows if c == command]
    cpu = [float(u) for c, _, u in rows if c == command]
    print(f"{command}: median {statistics.median(rates):,.0f}/s {sorted(rates)}, Redis CPU median {statistics.median(cpu)} us/command")
PY
    echo "stream length: $(redis-cli -p "$REDIS_PORT" xlen '{fanout.0}:s')"
    # Where herald_publish's time goes: the Redis commands it runs, alone,
    # and inside a function of our own. Once each, 300,000 commands.
    redis-cli -p "$REDIS_PORT" function load REPLACE "#!lua name=benchparts
redis.register_function('noop', function(keys, args) return 1 end)
redis.register_function('publish_only', function(keys, args) redis.call('PUBLISH', keys[1], args[1]) return 1 end)
redis.register_function('xadd_only', function(keys, args) redis.call('XADD', keys[1], 'MAXLEN', 10000, '*', 'd', args[1]) return 1 end)" >/dev/null
    part() {
        local before after rate
        before=$(awk '{print $14 + $15}' "/proc/$REDIS_PID/stat")
        rate=$(taskset -c "$GATEWAY_CORE" redis-benchmark -p "$REDIS_PORT" -c 4 -P 32 -n 300000 --csv "$@" |
            awk -F, 'NR == 2 {gsub(/"/, "", $2); print $2}')
        after=$(awk '{print $14 + $15}' "/proc/$REDIS_PID/stat")
        echo "part: ${*:1:3}: $rate/s, Redis CPU $(python3 -c "print(round(($after - $before) * 10000 / 300000, 2))") us/command" | tee -a "$results"
    }
    part FCALL noop 1 k "$payload"
    part FCALL publish_only 1 fanout.1 "$payload"
    part XADD part:exact MAXLEN 10000 '*' d "$payload"
    part XADD part:approx MAXLEN '~' 10000 '*' d "$payload"
    part FCALL xadd_only 1 part:function "$payload"
    part HINCRBY part:meta t 1
    part PEXPIRE part:meta 600000
    ;;
history-cpu)
    # Node CPU per delivery on a history channel against a plain one, same
    # fan-out: 1,000 subscribers on CHANNELS channels (default 1) through
    # Redis, RATE messages/s (default 100 and 400), PUBLISH to a plain node
    # and herald_publish to a history node, a fresh node each run, REPEAT
    # alternating pairs (default 5). What history adds is per message, not
    # per delivery: CHANNELS=100 (10 subscribers each) shows it more.
    start_redis
    config=$(history_config)
    channels=${CHANNELS:-1}
    for rate in $(rates 100 400); do
        tag=$rate
        [ "$channels" = 1 ] || tag=$rate-c$channels
        rm -f "$OUT"/history-cpu-*-"$tag"-*.json
        for i in $(seq 1 "${REPEAT:-5}"); do
            for kind in plain history; do
                if [ "$kind" = plain ]; then
                    NODE_CONFIG="" start_nodes 1 redis
                    publish=(--publish redis)
                else
                    NODE_CONFIG=$config start_nodes 1 redis
                    publish=(--publish function --history --check offsets-exact)
                fi
                tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" "${publish[@]}" \
                    --redis-url redis://127.0.0.1:$REDIS_PORT --subscribers 1000 --channels "$channels" \
                    --rate "$rate" --payload 100 --duration 10s --check lossless \
                    --json "$OUT/history-cpu-$kind-$tag-$i.json"
                kill "$NODE_PID"
                wait "$NODE_PID" 2>/dev/null || true
            done
        done
        for kind in plain history; do
            files=("$OUT"/history-cpu-$kind-$tag-*.json)
            echo "$kind at $rate/s over $channels channels: CPU per delivery median $(median "${files[@]}" -- results.cpu_us_per_delivery) us," \
                "p99 median $(median "${files[@]}" -- results.latency_ms.p99) ms"
        done
    done
    ;;
history-ci)
    # The CI-sized history run (loadtest/tests/history.rs).
    cargo test -q -p herald-loadtest --test history
    ;;
history)
    # Every history scenario, one after the other; fails at the end if any failed.
    failed=()
    for each in history-kills history-resume history-publish history-cpu; do
        "$0" "$each" || failed+=("$each")
    done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "failed: ${failed[*]}" >&2
        exit 1
    fi
    ;;
floor)
    # herald against the floor server (herald-floor: one non-blocking write
    # per delivery, nothing else), on the same core, same tool, same run,
    # REPEAT (default 3) rounds alternating: node CPU per delivery at 1k
    # subscribers x 100/s, and latency at 10k subscribers x 3/s; prints the
    # medians and herald's ratio to the floor.
    for round in $(seq 1 "${REPEAT:-3}"); do
        for server in herald floor; do
            start_server "$server"
            tool fanout $(floor_load 1000) --rate 100 --duration 15s --check lossless \
                --json "$OUT/floor-cpu-$server-$round.json"
            tool fanout $(floor_load 10000) --rate 3 --duration 15s --check lossless \
                --json "$OUT/floor-10k-$server-$round.json"
            stop_all_nodes
        done
    done
    python3 - "$OUT" "${REPEAT:-3}" <<'PY'
import json, statistics, sys
out, repeat = sys.argv[1], int(sys.argv[2])
def med(kind, server, *path):
    values = []
    for round in range(1, repeat + 1):
        value = json.load(open(f"{out}/floor-{kind}-{server}-{round}.json"))["results"]
        for key in path:
            value = value[key]
        values.append(value)
    return statistics.median(values), values
rows = [
    ("1k x 100/s: CPU per delivery (us)", "cpu", ("cpu_us_per_delivery",)),
    ("1k x 100/s: p99 (ms)", "cpu", ("latency_ms", "p99")),
    ("10k x 3/s: p50 (ms)", "10k", ("latency_ms", "p50")),
    ("10k x 3/s: p99 (ms)", "10k", ("latency_ms", "p99")),
]
for label, kind, path in rows:
    (h, hs), (f, fs) = med(kind, "herald", *path), med(kind, "floor", *path)
    print(f"{label}: herald {h:.3f} {hs}, floor {f:.3f} {fs}, ratio {h / f:.2f}")
PY
    ;;
floor-sweep)
    # Figure 10's charts: herald and the floor server with floor's load, a
    # fresh server for every point, alternating: 1,000 subscribers x RATES
    # publishes/s (default 25 50 100 200 400) and 10,000 subscribers x 1, 3
    # and 10/s, 12 s each, no assertions. Then `herald-loadtest chart` draws
    # p50, p90 and p99 against deliveries/s into docs/bench/floor-1k.svg and
    # floor-10k.svg (CHARTS=dir puts them elsewhere).
    CHARTS=${CHARTS:-docs/bench}
    mkdir -p "$CHARTS"
    for subscribers in 1000 10000; do
        if [ "$subscribers" = 1000 ]; then
            size=1k count=1,000 sweep=$(rates 25 50 100 200 400)
        else
            size=10k count=10,000 sweep="1 3 10"
        fi
        herald_files=() floor_files=()
        for rate in $sweep; do
            for server in herald floor; do
                file="$OUT/floor-sweep-$size-$server-$rate.json"
                start_server "$server"
                tool fanout $(floor_load "$subscribers") --rate "$rate" --duration 12s --json "$file"
                stop_all_nodes
                if [ "$server" = herald ]; then herald_files+=("$file"); else floor_files+=("$file"); fi
            done
        done
        "$TOOL" chart --series "herald=$(IFS=,; echo "${herald_files[*]}")" \
            --series "floor=$(IFS=,; echo "${floor_files[*]}")" \
            --title "herald and the floor server, $count subscribers on one channel" \
            --out "$CHARTS/floor-$size.svg"
    done
    ;;
tls)
    # What TLS costs: the same runs over ws:// and wss://, one node with a
    # Redis broker (the tool publishes through Redis, so that the publish
    # path is the same for both): idle memory per subscribed connection at
    # 10k, handshakes per second, and node CPU per delivery and latency at
    # 1k subscribers x 100/s. REPEAT (default 3) rounds, alternating.
    start_redis
    for round in $(seq 1 "${REPEAT:-3}"); do
        for mode in plain tls; do
            tls=""
            [ "$mode" = tls ] && tls=1
            TLS=$tls start_nodes 1 redis
            TLS=$tls tool connect "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --source-ips 2 \
                --connections 10000 --rate 2000 --channels-per-conn 1 --channel-count 100 --hold 5s \
                --json "$OUT/tls-memory-$mode-$round.json"
            stop_all_nodes
            TLS=$tls start_nodes 1 redis
            TLS=$tls tool connect "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --source-ips 2 \
                --connections 15000 --rate "$(rates 10000)" --channels-per-conn 1 --channel-count 100 --hold 1s \
                --json "$OUT/tls-handshakes-$mode-$round.json"
            stop_all_nodes
            TLS=$tls start_nodes 1 redis
            TLS=$tls tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" \
                --publish redis --redis-url redis://127.0.0.1:$REDIS_PORT \
                --subscribers 1000 --channels 1 --rate 100 --payload 100 --duration 15s --check lossless \
                --json "$OUT/tls-cpu-$mode-$round.json"
            stop_all_nodes
        done
    done
    for mode in plain tls; do
        files=() hs=() cpu=()
        for round in $(seq 1 "${REPEAT:-3}"); do
            files+=("$OUT/tls-memory-$mode-$round.json")
            hs+=("$OUT/tls-handshakes-$mode-$round.json")
            cpu+=("$OUT/tls-cpu-$mode-$round.json")
        done
        echo "$mode: idle bytes per connection $(median "${files[@]}" -- results.memory_per_connection_bytes)," \
            "handshakes/s $(median "${hs[@]}" -- results.handshakes_per_sec)," \
            "CPU per delivery $(median "${cpu[@]}" -- results.cpu_us_per_delivery) us," \
            "p50 $(median "${cpu[@]}" -- results.latency_ms.p50) ms, p99 $(median "${cpu[@]}" -- results.latency_ms.p99) ms"
    done
    ;;
profile)
    # Where a delivery's CPU goes (issue 13): `perf record -e cpu-clock`
    # of the node during 1k subscribers x 100/s and 10k subscribers x 3/s,
    # with server.direct_delivery off (the default: every delivery goes
    # through the connection's writer task) and on (a push writes on the
    # spot). Writes OUT/profile-LOAD-direct-BOOL.txt: the run's CPU per
    # delivery and latency, user against kernel time, the top symbols.
    command -v perf >/dev/null || { echo "profile needs perf (apt-get install linux-perf)" >&2; exit 1; }
    for direct in false true; do
        for load in 1k 10k; do
            HERALD_SERVER__DIRECT_DELIVERY=$direct start_nodes 1
            NODE=${PIDFLAGS[1]}
            if [ "$load" = 1k ]; then
                shape=(--subscribers 1000 --channels 1 --rate 100)
            else
                shape=(--subscribers 10000 --connect-rate 5000 --channels 1 --rate 3 --source-ips 2)
            fi
            # The profile starts once the subscribers are in and the warm-up
            # is over (10,000 connect in 2 s), and ends before the last
            # deliveries: it shows deliveries, not handshakes.
            data="$OUT/profile-$load-direct-$direct.perf"
            (sleep 5 && exec perf record -q -e cpu-clock -F 999 -p "$NODE" -o "$data" -- sleep 10) &
            perf_pid=$!
            tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) "${shape[@]}" \
                --payload 100 --duration 15s --check lossless --json "$OUT/profile-$load-direct-$direct.json"
            wait "$perf_pid" || true
            stop_all_nodes
            summary="$OUT/profile-$load-direct-$direct.txt"
            {
                python3 - "$OUT/profile-$load-direct-$direct.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
print(f"cpu per delivery {r['cpu_us_per_delivery']} us, p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms")
PY
                echo "-- by object (kernel against user)"
                perf report -i "$data" --no-children --sort dso -q -g none 2>/dev/null | grep -v '^$' | head -6 || true
                echo "-- top symbols (self)"
                perf report -i "$data" --no-children --sort sym -q -g none 2>/dev/null | grep -v '^$' | head -25 || true
            } >"$summary"
            echo "== $load, direct_delivery=$direct"
            cat "$summary"
        done
    done
    ;;
faults)
    # Every fault scenario and drain, one after the other; fails at the end
    # if any failed.
    failed=()
    for each in faults-redis-kill faults-client-kill faults-redis-pause faults-sigterm faults-slow-attack faults-leaks drain; do
        "$0" "$each" || failed+=("$each")
    done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "failed: ${failed[*]}" >&2
        exit 1
    fi
    ;;
*)
    echo "unknown scenario $scenario" >&2
    exit 64
    ;;
esac
