#!/usr/bin/env bash
# Installs (when missing) and runs the real engines tern's cluster mode and
# its conformance suites use, on loopback only:
#   Redis      127.0.0.1:${TERN_REDIS_PORT:-16379}   (Debian redis-server)
#   ZooKeeper  127.0.0.1:${TERN_ZK_PORT:-12181}      (Debian zookeeper)
#   Kafka API  127.0.0.1:${TERN_KAFKA_PORT:-19092}   (tansu broker from crates.io, memory engine)
#
#   scripts/engines.sh start   install what is missing, start, wait until each answers
#   scripts/engines.sh stop    stop what start started
#   scripts/engines.sh env     print the TERN_* variables that point tern at them
#
# State (data, logs, pids) lives in $TERN_ENGINES_DIR (default target/engines).
# tansu is built once into $TERN_TOOLS_DIR (default /opt/tern-tools); the
# first build takes about 15 minutes on 2 cores.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
state="${TERN_ENGINES_DIR:-$repo/target/engines}"
tools="${TERN_TOOLS_DIR:-/opt/tern-tools}"
redis_port="${TERN_REDIS_PORT:-16379}"
zk_port="${TERN_ZK_PORT:-12181}"
kafka_port="${TERN_KAFKA_PORT:-19092}"
tansu_version="0.6.0"

log() { echo "engines: $*" >&2; }

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
[ -f /usr/share/java/zookeeper.jar ] || need_apt+=(zookeeper)
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)

install() {
    if [ ${#need_apt[@]} -gt 0 ]; then
        log "installing ${need_apt[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    fi
    if [ ! -x "$tools/bin/tansu" ]; then
        log "building tansu $tansu_version (Kafka-compatible broker) into $tools; this takes a while"
        mkdir -p "$tools"
        cargo install tansu --version "$tansu_version" --locked --features dynostore --root "$tools" --quiet
    fi
}

# wait_for NAME CMD...: retries CMD for up to 60 s.
wait_for() {
    local name=$1; shift
    for _ in $(seq 1 120); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "$name did not come up; its log:"
    tail -n 30 "$state/$name.log" >&2 || true
    return 1
}

# A process killed but not yet reaped (a zombie: here PID 1 may never reap
# the orphans this script leaves) still answers kill -0; it is not running.
alive() { kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" != "Z" ]; }
running() { [ -f "$state/$1.pid" ] && alive "$(cat "$state/$1.pid")"; }

zk_ok() { [ "$(exec 3<>/dev/tcp/127.0.0.1/"$zk_port"; echo ruok >&3; timeout 2 cat <&3)" = "imok" ]; }
kafka_ok() { (exec 3<>/dev/tcp/127.0.0.1/"$kafka_port") 2>/dev/null; }

start() {
    install
    mkdir -p "$state"
    if ! running redis; then
        redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
            --daemonize no --dir "$state" >"$state/redis.log" 2>&1 &
        echo $! >"$state/redis.pid"
    fi
    wait_for redis redis-cli -h 127.0.0.1 -p "$redis_port" ping

    if ! running zookeeper; then
        mkdir -p "$state/zookeeper-data"
        cat >"$state/zoo.cfg" <<CFG
tickTime=500
dataDir=$state/zookeeper-data
clientPort=$zk_port
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=*
minSessionTimeout=1000
maxSessionTimeout=30000
CFG
        java -Xmx256m -cp "/usr/share/java/zookeeper.jar:/usr/share/java/*:/etc/zookeeper/conf" \
            org.apache.zookeeper.server.quorum.QuorumPeerMain "$state/zoo.cfg" >"$state/zookeeper.log" 2>&1 &
        echo $! >"$state/zookeeper.pid"
    fi
    wait_for zookeeper zk_ok

    if ! running tansu; then
        "$tools/bin/tansu" broker \
            --storage-engine "memory://tansu/" \
            --listener-url "tcp://127.0.0.1:$kafka_port" \
            --advertised-listener-url "tcp://127.0.0.1:$kafka_port" >"$state/tansu.log" 2>&1 &
        echo $! >"$state/tansu.pid"
    fi
    wait_for tansu kafka_ok
    log "running: redis :$redis_port, zookeeper :$zk_port, kafka (tansu) :$kafka_port"
}

# Waits for each engine to exit (SIGKILL after 10 s): a start right after a
# stop was otherwise answered by the dying process on its port, declared the
# engine up, and was left with none once it exited (its successor had found
# the port taken).
stop() {
    for name in tansu zookeeper redis; do
        if running "$name"; then
            local pid
            pid="$(cat "$state/$name.pid")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do
                alive "$pid" || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$state/$name.pid"
    done
}

env_vars() {
    echo "export TERN_REDIS_URL=redis://127.0.0.1:$redis_port/"
    echo "export TERN_ZK_ADDR=127.0.0.1:$zk_port"
    echo "export TERN_KAFKA_BROKERS=127.0.0.1:$kafka_port"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) env_vars ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
