#!/usr/bin/env bash
# The benchmark suite in one command (see bench/README.md):
#   ./scripts/bench.sh                    full profile (the issue's sizes; long)
#   ./scripts/bench.sh --profile smoke    seconds-long runs at small sizes
# Installs what is missing (Debian mosquitto, nats-server, fonts-dejavu-core
# for the plot labels; apt-get, as root), builds tern and tern-bench in
# release mode, runs every scenario against servers it starts on loopback
# (and against ./scripts/cluster.sh's cluster when it is up), and writes
# bench-results/results.json, bench-results/*.png and BENCHMARKS.md.
# Extra arguments go to `tern-bench all` (e.g. --no-peers, --no-cluster).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

log() { echo "bench: $*" >&2; }

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        log "not root: install ${missing[*]} yourself (apt-get install -y ${missing[*]})"
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian package starts a system-wide broker; the suite runs its own.
if systemctl is-active --quiet mosquitto 2>/dev/null; then
    log "note: a system mosquitto service is running; the suite starts its own on a free port"
fi
export PATH="$PATH:/usr/sbin"

log "building tern and tern-bench (release)"
cargo build --release --quiet -p tern -p tern-bench

exec "$repo/target/release/tern-bench" all --tern-bin "$repo/target/release/tern" "$@"
