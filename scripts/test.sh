#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every test.
#
# It installs what the tests need when it is missing (a C compiler; Redis,
# ZooKeeper and the tansu Kafka-compatible broker through scripts/engines.sh,
# whose first tansu build takes about 15 minutes), starts the engines on
# loopback, runs everything against them, and stops them again. The
# conformance and cluster suites are required to run here: a missing engine
# fails them instead of skipping them. ScyllaDB and MongoDB cannot be
# installed on this machine; their suites run only when TERN_SCYLLA_NODES /
# TERN_MONGO_URI name a server.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
    echo "installing a C toolchain (ring and librdkafka build from source)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >/dev/null
fi

# A single build from scratch gains nothing from incremental state, and it
# would double the disk the target directory takes.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

./scripts/engines.sh start
trap './scripts/engines.sh stop' EXIT
eval "$(./scripts/engines.sh env)"
export TERN_REQUIRE_ENGINES="TERN_REDIS_URL,TERN_ZK_ADDR,TERN_KAFKA_BROKERS"

cargo test --workspace --locked
