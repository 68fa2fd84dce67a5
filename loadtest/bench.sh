#!/usr/bin/env bash
# Reproduces one figure of BENCHMARKS.md per invocation:
#
#   loadtest/bench.sh memory|handshakes|fanout-1k|cpu-100k|fanout-10k|fanout-10k-redis|slow|storm|100k [RATE...]
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
HERALD=target/release/herald
TOOL=target/release/herald-loadtest

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_ready() {
    for _ in $(seq 1 200); do
        if curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "node on port $1 never became ready" >&2
    return 1
}

# start_redis: sets REDIS_PORT.
start_redis() {
    REDIS_PORT=$(free_port)
    taskset -c "$TOOL_CORE" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --loglevel warning >/dev/null &
    PIDS+=($!)
    for _ in $(seq 1 100); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "redis did not start" >&2
    return 1
}

# start_nodes COUNT [BROKER]: sets URLS (--url flags), PIDFLAGS (--pid flags), PORTS.
start_nodes() {
    local count=$1 broker=${2:-memory}
    URLS=() PIDFLAGS=() PORTS=()
    for i in $(seq 1 "$count"); do
        local port
        port=$(free_port)
        local env=(HERALD_AUTH__HMAC_SECRET=$SECRET HERALD_API__KEY=$KEY HERALD_NODE__ID=bench$i
            HERALD_SERVER__LISTEN=127.0.0.1:$port HERALD_LOG__LEVEL=warn
            HERALD_LIMITS__CONNECTION_RATE=100000 HERALD_LIMITS__CONNECTION_BURST=100000
            HERALD_LIMITS__CONNECTION_RATE_PER_IP=0 HERALD_SERVER__MAX_HTTP_CONNECTIONS=20000
            HERALD_SHUTDOWN__DRAIN_PERIOD=${DRAIN_PERIOD:-0s})
        if [ "$broker" = redis ]; then
            env+=(HERALD_BROKER__KIND=redis HERALD_BROKER__URL=redis://127.0.0.1:$REDIS_PORT)
        fi
        env "${env[@]}" taskset -c "$GATEWAY_CORE" "$HERALD" serve &
        PIDS+=($!)
        PIDFLAGS+=(--pid $!)
        URLS+=(--url ws://127.0.0.1:$port/ws)
        PORTS+=("$port")
    done
    for port in "${PORTS[@]}"; do wait_ready "$port"; done
}

tool() {
    ulimit -n 20000
    taskset -c "$TOOL_CORE" "$TOOL" "$@"
}

api() {
    echo --publish api --api-url "http://127.0.0.1:${PORTS[0]}/api/publish" --api-key "$KEY"
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
    # Figure 1: memory per idle subscribed connection at 10k connections.
    start_nodes 1
    tool connect "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --source-ips 2 \
        --connections 10000 --rate 2000 --channels-per-conn 1 --channel-count 100 --hold 5s \
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
    # Target: server CPU per delivery at 100k deliveries/s (1k subscribers x 100/s).
    start_nodes 1
    tool fanout "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" $(api) \
        --subscribers 1000 --channels 1 --rate 100 --payload 100 --duration 20s \
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
    # Figure 2: 100k connections over 6 nodes and one Redis, held for HOLD (default 5m).
    start_redis
    start_nodes 6 redis
    HOLD=${HOLD:-5m}
    tool connect "${URLS[@]}" --secret $SECRET "${PIDFLAGS[@]}" --workers 6 --source-ips 24 \
        --connections 100000 --rate 5000 --channels-per-conn 1 --channel-count 1000 --hold "$HOLD" \
        --json "$OUT/100k.json" &
    TOOL_PID=$!
    # Sample every part once all are connected and again before the end; the
    # CPU difference is what holding 100k connections with pings costs.
    HOLD_SECONDS=$(python3 -c "import re,sys; v='$HOLD'; n=float(re.sub('[a-z]','',v)); print(int(n*60 if v.endswith('m') else n))")
    sleep 40
    sample start >"$OUT/100k-samples.txt"
    grep -E 'Slab|MemAvailable|MemFree' /proc/meminfo | sed 's/^/start /' >>"$OUT/100k-samples.txt"
    sleep $((HOLD_SECONDS - 30))
    sample end >>"$OUT/100k-samples.txt"
    grep -E 'Slab|MemAvailable|MemFree' /proc/meminfo | sed 's/^/end /' >>"$OUT/100k-samples.txt"
    cat "$OUT/100k-samples.txt"
    wait $TOOL_PID
    ;;
*)
    echo "unknown scenario $scenario" >&2
    exit 64
    ;;
esac
