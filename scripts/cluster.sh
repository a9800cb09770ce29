#!/usr/bin/env bash
# A local tern cluster on loopback, every role its own process:
#   scripts/cluster.sh up      start the engines (scripts/engines.sh), build tern, start
#                              router-auth, idgen, 2 dispatchers, group-svc, offline-svc
#                              and 2 access-tcp nodes
#   scripts/cluster.sh down    stop the roles (SIGTERM, drained), then the engines
#   scripts/cluster.sh status  which processes run
# State, logs and the generated config live in $TERN_CLUSTER_DIR (default target/cluster).
# TERN_BIN names a tern binary to use instead of building the release one.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${TERN_CLUSTER_DIR:-$repo/target/cluster}"
roles=(router-auth idgen dispatcher-1 dispatcher-2 group-svc offline-svc access-1 access-2)

log() { echo "cluster: $*" >&2; }

# role-name → "subcommand args"
role_args() {
    case "$1" in
        router-auth) echo "router-auth --listen 127.0.0.1:17881 --http-listen 127.0.0.1:17880" ;;
        idgen) echo "idgen --listen 127.0.0.1:17840" ;;
        dispatcher-1) echo "dispatcher --listen 127.0.0.1:17810" ;;
        dispatcher-2) echo "dispatcher --listen 127.0.0.1:17811" ;;
        group-svc) echo "group-svc --listen 127.0.0.1:17830" ;;
        offline-svc) echo "offline-svc --listen 127.0.0.1:17820" ;;
        access-1) echo "access-tcp --listen 127.0.0.1:17800 --internal-listen 127.0.0.1:17900" ;;
        access-2) echo "access-tcp --listen 127.0.0.1:17801 --internal-listen 127.0.0.1:17901" ;;
    esac
}

# A process killed but not yet reaped (a zombie: here PID 1 may never reap
# the orphans this script leaves) still answers kill -0; it is not running.
alive() { kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" != "Z" ]; }
running() { [ -f "$dir/$1.pid" ] && alive "$(cat "$dir/$1.pid")"; }

up() {
    "$repo/scripts/engines.sh" start
    eval "$("$repo/scripts/engines.sh" env)"
    local bin="${TERN_BIN:-}"
    if [ -z "$bin" ]; then
        log "building tern (release)"
        cargo build --release --quiet -p tern --manifest-path "$repo/Cargo.toml"
        bin="$repo/target/release/tern"
    fi
    mkdir -p "$dir"
    if [ ! -f "$dir/cluster.toml" ]; then
        cat >"$dir/cluster.toml" <<CFG
data_dir = "$dir/data"
shutdown_grace_secs = 10

[engines]
redis_url = "$TERN_REDIS_URL"
zookeeper = "$TERN_ZK_ADDR"
kafka_brokers = "$TERN_KAFKA_BROKERS"
zookeeper_session_timeout_ms = 4000
kafka_session_timeout_ms = 6000
# tansu holds an empty fetch for the whole wait: keep the bus hop short.
kafka_fetch_wait_ms = 10

[router_auth]
token_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
CFG
    fi
    for role in "${roles[@]}"; do
        if running "$role"; then continue; fi
        # shellcheck disable=SC2046
        "$bin" $(role_args "$role") --config "$dir/cluster.toml" --node-id "$role" \
            >"$dir/$role.out" 2>"$dir/$role.log" &
        echo $! >"$dir/$role.pid"
        for _ in $(seq 1 120); do
            if grep -q " ready: " "$dir/$role.out" 2>/dev/null; then break; fi
            if ! running "$role"; then log "$role failed to start:"; tail -n 20 "$dir/$role.log" >&2; exit 1; fi
            sleep 0.25
        done
        grep -h " ready: " "$dir/$role.out" >&2
    done
    log "up. Chat with: $bin chat --auth http://127.0.0.1:17880 --ca $dir/data/tls/ca.pem --user alice --password alice-pw"
    local redis_port="${TERN_REDIS_URL##*:}"
    redis_port="${redis_port%/}"
    log "look inside: redis-cli -p $redis_port --scan | head; echo 'ls -R /tern' | zkCli (or: java -cp '/usr/share/java/*' org.apache.zookeeper.ZooKeeperMain -server $TERN_ZK_ADDR ls -R /tern)"
}

down() {
    for role in "${roles[@]}"; do
        if running "$role"; then kill -TERM "$(cat "$dir/$role.pid")" 2>/dev/null || true; fi
    done
    for role in "${roles[@]}"; do
        for _ in $(seq 1 60); do running "$role" || break; sleep 0.25; done
        if running "$role"; then kill -KILL "$(cat "$dir/$role.pid")" 2>/dev/null || true; fi
        rm -f "$dir/$role.pid"
    done
    "$repo/scripts/engines.sh" stop
    log "down"
}

status() {
    for role in "${roles[@]}"; do
        if running "$role"; then echo "$role running (pid $(cat "$dir/$role.pid"))"; else echo "$role stopped"; fi
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
