#!/usr/bin/env bash
# The worker against a plain Python worker, end to end, on the same events, broker and model:
#   scripts/bench-vs-python.sh [--events N] [--candidates K] [any other `reranker bench` option]
# Writes the near-zero-cost model (`reranker make-model`: an embedding lookup, a masked mean and a
# dot product with the real model's tokenizer) into a temp dir, then runs `reranker bench --model-dir
# DIR --python-peer`, which starts a local tansu, produces SciFact events (default 100 × 100
# candidates), runs the worker, then scripts/python_peer.py on the same input topic, and prints
# both pairs/s, both CPU µs/pair and the ratios. Needs: cargo build --release, scripts/setup.sh
# --with-broker --with-python (ORT_DYLIB_PATH and RERANKER_MODEL__DIR from its --print-env).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${RERANKER_BIN:-$REPO_ROOT/target/release/reranker}"
[ -x "$BIN" ] || { echo "bench-vs-python: $BIN not built (cargo build --release)" >&2; exit 1; }
if [ -z "${ORT_DYLIB_PATH:-}" ] || [ -z "${RERANKER_MODEL__DIR:-}" ]; then
  eval "$(bash "$REPO_ROOT/scripts/setup.sh" --print-env)"
fi
dir="$(mktemp -d "${TMPDIR:-/tmp}/near-zero-model.XXXXXX")"
trap 'rm -rf "$dir"' EXIT
"$BIN" make-model --from "$RERANKER_MODEL__DIR" --out "$dir/near-zero"
echo "load: $(uptime)" >&2
cd "$REPO_ROOT"
defaults=()
case " $* " in *" --events"*) ;; *) defaults+=(--events 100) ;; esac
case " $* " in *" --candidates"*) ;; *) defaults+=(--candidates 100) ;; esac
"$BIN" bench --model-dir "$dir/near-zero" --python-peer "$REPO_ROOT/scripts/python_peer.py" \
  "${defaults[@]}" "$@"
