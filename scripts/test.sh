#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every test.
# Needs only the Rust toolchain and a C compiler (for ring); the standalone
# tests start the real `tern` binary on loopback with embedded backends.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null 2>&1; then
    echo "installing a C compiler (needed to build ring)" >&2
    apt-get update -qq && apt-get install -y -qq build-essential
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
