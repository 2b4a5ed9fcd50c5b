#!/usr/bin/env bash
# One prepared GPU check: the model on CPU and on CUDA side by side (check-model + bare-session
# benchmark), as a short table, and the host path's scaling with admission threads. Made for an
# NVIDIA machine without internet; finishes in < 8 min.
#
#   scripts/gpu-check.sh                # here: CPU half only (no GPU), proves the script runs
#   RERANKER_BIN=dist/reranker-cuda ORT_GPU_DIR=.gpu/ort scripts/gpu-check.sh   # on the GPU box
#
# What the GPU box needs, carried in (no downloads there):
#   - RERANKER_BIN: built here with `cargo build --release --features cuda` (or cargo on the box).
#   - ORT_GPU_DIR: libonnxruntime.so.* + libonnxruntime_providers_{shared,cuda}.so from the
#     onnxruntime-gpu wheel. The CUDA provider library is ~190 MB even compressed, over the 64 MiB a
#     device call carries: `scripts/gpu-check.sh --pack DIR` splits it into 60 MB parts
#     (.gpu/parts/*), to be carried over consecutive calls and joined with `--unpack`.
#   - CUDA 13 / cuDNN 9 runtime libraries: the box's Python environment ships them as nvidia-* wheels;
#     they are found through `python3 -c 'import nvidia'`.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  --pack)
    src="${2:?--pack DIR-with-onnxruntime-gpu-libs}"
    mkdir -p .gpu/parts
    tar -C "$src" -czf - . | split -b 60m - .gpu/parts/ort-gpu.tgz.
    ls -l .gpu/parts
    exit 0 ;;
  --unpack)
    mkdir -p .gpu/ort
    cat .gpu/parts/ort-gpu.tgz.* | tar -C .gpu/ort -xzf -
    exit 0 ;;
esac

MODEL_DIR="${RERANKER_MODEL__DIR:-../shared/models/minilm-l6-ce}"
[ -d "$MODEL_DIR" ] || MODEL_DIR=shared/models/minilm-l6-ce
BIN="${RERANKER_BIN:-}"
if [ -z "$BIN" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then feat=(--features cuda); else feat=(); fi
  cargo build --release --locked "${feat[@]}" >&2
  BIN=target/release/reranker
fi
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
SECONDS_PER_SHAPE="${SECONDS_PER_SHAPE:-1.5}"

bench() { # device, extra env...
  local dev=$1
  timeout 240 "$BIN" bench --model-only --json --seconds "$SECONDS_PER_SHAPE" \
    --batch-sizes 1,8,32,64 --seq-lens 64,128,256 \
    --model-dir "$MODEL_DIR" --set "model.device=\"$dev\"" > "$OUT/bench-$dev.json"
}

echo "== CPU" >&2
if [ -z "${ORT_DYLIB_PATH:-}" ]; then eval "$(bash scripts/setup.sh --print-env 2>/dev/null)" || true; fi
timeout 240 "$BIN" check-model --model "$MODEL_DIR" | tee "$OUT/check-cpu.txt"
bench cpu

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  [ -d .gpu/ort ] || [ ! -d .gpu/parts ] || bash "$0" --unpack
  ORT_GPU_DIR="${ORT_GPU_DIR:-.gpu/ort}"
  lib=$(ls "$ORT_GPU_DIR"/libonnxruntime.so.* 2>/dev/null | head -1)
  [ -n "$lib" ] || { echo "no onnxruntime-gpu library in $ORT_GPU_DIR" >&2; exit 1; }
  nv=$(python3 -c 'import nvidia, os; print(":".join(sorted({os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p) if os.path.isdir(os.path.join(p, d, "lib"))})))' 2>/dev/null || true)
  export LD_LIBRARY_PATH="$(cd "$ORT_GPU_DIR" && pwd):${nv}:${LD_LIBRARY_PATH:-}"
  export ORT_DYLIB_PATH="$lib"
  echo "== CUDA" >&2
  timeout 240 "$BIN" check-model --model "$MODEL_DIR" --set 'model.device="cuda"' | tee "$OUT/check-cuda.txt"
  bench cuda
else
  echo "(no NVIDIA GPU here: CUDA half skipped)" >&2
fi

# The host side that has to feed the GPU: pairs/s and CPU per pair per admission thread count, no
# model, no broker (SciFact pairs, beside the bare tokenizer on the same pairs).
DATA="${RERANKER_DATA:-../shared/data/scifact/retrieval-top100.jsonl.gz}"
if [ -f "$DATA" ]; then
  cores=$(nproc)
  threads=1; t=2; while [ "$t" -lt "$cores" ]; do threads="$threads,$t"; t=$((t * 2)); done
  if [ "$cores" -le 2 ]; then threads=1,2; else threads="$threads,$((cores - 1))"; fi
  echo "== host path, admission threads $threads" >&2
  timeout 240 "$BIN" bench --host-only --events 2000 --candidates 10 --threads "$threads" \
    --data "$DATA" --model-dir "$MODEL_DIR" | tee "$OUT/host.txt"
else
  echo "(no SciFact data at $DATA: host-path bench skipped)" >&2
fi

python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
runs = {d: json.load(open(os.path.join(out, f"bench-{d}.json"))) for d in ("cpu", "cuda")
        if os.path.exists(os.path.join(out, f"bench-{d}.json"))}
cpu = {(r["batch"], r["seq_len"]): r for r in runs.get("cpu", [])}
cuda = {(r["batch"], r["seq_len"]): r for r in runs.get("cuda", [])}
print(f"{'batch':>5} {'seq':>5} {'cpu pairs/s':>12} {'cuda pairs/s':>13} {'speed-up':>9}")
for k in sorted(cpu):
    c = cpu[k]["pairs_per_s"]
    g = cuda.get(k, {}).get("pairs_per_s")
    print(f"{k[0]:>5} {k[1]:>5} {c:>12.1f} " + (f"{g:>13.1f} {g / c:>8.1f}x" if g else f"{'-':>13} {'-':>9}"))
EOF
