#!/usr/bin/env bash
# Runs the end-to-end demo (starts its own broker); extra args go to `reranker demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup.sh --with-broker --print-env)"
exec cargo run --release --locked -- demo "$@"
