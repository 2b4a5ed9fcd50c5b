#!/usr/bin/env bash
# The project's one test command: installs what is missing, builds, runs every test.
#   scripts/test.sh [cargo test args...]   e.g. scripts/test.sh --test kafka -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup.sh --with-broker --with-python --with-prometheus --print-env)"

# Tests share one broker and the 2-core machine; run them one at a time unless told otherwise.
# RUST_TEST_THREADS (not `-- --test-threads=1`) so that it still holds when extra args are passed.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-1}"
cargo build --release --locked --bins
cargo test --release --locked "$@"
