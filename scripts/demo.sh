#!/usr/bin/env bash
# Runs the end-to-end demo (starts its own broker); extra args go to `reranker demo`.
#   scripts/demo.sh                  # a local tansu broker process (built once by setup.sh, ~10 min)
#   scripts/demo.sh --broker mock    # librdkafka's in-process mock cluster: no broker to build
set -euo pipefail
cd "$(dirname "$0")/.."
broker=(--with-broker)
prev=""
for a in "$@"; do
  if [ "$a" = "--broker=mock" ] || { [ "$prev" = "--broker" ] && [ "$a" = mock ]; }; then broker=(); fi
  prev="$a"
done
eval "$(bash scripts/setup.sh "${broker[@]}" --print-env)"
exec cargo run --release --locked -- demo "$@"
