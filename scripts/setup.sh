#!/usr/bin/env bash
# Installs what the build, tests and demo need; safe to re-run (each step is skipped when already done).
#   scripts/setup.sh [--model DIR|URL] [--with-broker] [--with-python] [--with-prometheus] [--with-fuzz] [--with-helm] [--print-env]
# Progress goes to stderr so that `eval "$(scripts/setup.sh --print-env ...)"` sees only the env lines.
set -euo pipefail

ORT_VERSION=1.31.1
TANSU_VERSION=0.6.0
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY_TOKENIZERS_VERSION=0.23.2
CACHE="${RERANKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reranker}"
MODEL_SRC="${RERANKER_MODEL_SRC:-$REPO_ROOT/../shared/models/minilm-l6-ce}"
WITH_BROKER=0 WITH_PYTHON=0 WITH_PROMETHEUS=0 WITH_FUZZ=0 WITH_HELM=0 PRINT_ENV=0

say() { echo "setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --model) [ $# -ge 2 ] || die "--model needs a directory or URL"; MODEL_SRC="$2"; shift 2 ;;
    --model=*) MODEL_SRC="${1#--model=}"; shift ;;
    --with-broker) WITH_BROKER=1; shift ;;
    --with-python) WITH_PYTHON=1; shift ;;
    --with-prometheus) WITH_PROMETHEUS=1; shift ;;
    --with-fuzz) WITH_FUZZ=1; shift ;;
    --with-helm) WITH_HELM=1; shift ;;
    --print-env) PRINT_ENV=1; shift ;;
    -h|--help) sed -n '2,4p' "$0" >&2; exit 0 ;;
    *) die "unknown option: $1" ;;
  esac
done

# CI's environment may lack rustup's bin dir; tansu also lands there.
case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac
mkdir -p "$CACHE"

# --- Debian build deps (rdkafka builds librdkafka from source with ssl, zstd and libz) ---
missing=()
for pkg in libssl-dev zlib1g-dev pkg-config make g++ curl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" </dev/null >&2
fi

# --- Prometheus server for tests/observability.rs, which runs /usr/bin/prometheus itself on a free
# loopback port (the Debian service is not used) ---
if [ "$WITH_PROMETHEUS" = 1 ]; then
  if [ ! -x /usr/bin/prometheus ]; then
    say "installing Debian package: prometheus"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus </dev/null >&2
  fi
  [ -x /usr/bin/prometheus ] || die "prometheus is still missing after apt-get install"
  say "prometheus: $(/usr/bin/prometheus --version 2>&1 | head -n1)"
fi

# --- ONNX Runtime shared library (ort's load-dynamic feature dlopens it via ORT_DYLIB_PATH) ---
ORT_LIB="$CACHE/ort/libonnxruntime.so.$ORT_VERSION"
if [ ! -f "$ORT_LIB" ]; then
  say "fetching onnxruntime $ORT_VERSION wheel"
  mkdir -p "$CACHE/ort-wheel" "$CACHE/ort"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "onnxruntime==$ORT_VERSION" -d "$CACHE/ort-wheel" >&2
  # Extract to a temp name first so an interrupted run never leaves a truncated library behind.
  python3 - "$CACHE/ort-wheel" "$ORT_LIB" "$ORT_VERSION" <<'PY'
import glob, os, sys, zipfile
wheel_dir, dest, version = sys.argv[1:]
wheels = sorted(glob.glob(os.path.join(wheel_dir, f"onnxruntime-{version}-*.whl")))
if not wheels:
    sys.exit(f"no onnxruntime {version} wheel in {wheel_dir}")
with zipfile.ZipFile(wheels[-1]) as z:
    data = z.read(f"onnxruntime/capi/libonnxruntime.so.{version}")
with open(dest + ".tmp", "wb") as f:
    f.write(data)
os.replace(dest + ".tmp", dest)
PY
fi
ln -sfn "libonnxruntime.so.$ORT_VERSION" "$CACHE/ort/libonnxruntime.so"
say "onnxruntime: $ORT_LIB"

# --- Model: a local directory is used in place; a URL is a HuggingFace-style repo folder ---
fetch() {  # fetch URL DEST: write atomically so a half download is never taken as done
  # shellcheck disable=SC2015  # the cleanup is meant to run when either step fails
  curl -fsL --retry 3 -o "$2.part" "$1" && mv "$2.part" "$2" || { rm -f "$2.part"; return 1; }
}
case "$MODEL_SRC" in
  http://*|https://*)
    base="${MODEL_SRC%/}"
    MODEL_DIR="$CACHE/models/$(printf '%s' "$base" | sed -E 's#^https?://##; s#[^A-Za-z0-9._-]+#_#g')"
    if [ ! -f "$MODEL_DIR/model.onnx" ] || [ ! -f "$MODEL_DIR/tokenizer.json" ]; then
      say "downloading model from $base"
      mkdir -p "$MODEL_DIR"
      [ -f "$MODEL_DIR/model.onnx" ] || fetch "$base/model.onnx" "$MODEL_DIR/model.onnx" \
        || fetch "$base/onnx/model.onnx" "$MODEL_DIR/model.onnx" || die "no model.onnx or onnx/model.onnx under $base"
      [ -f "$MODEL_DIR/tokenizer.json" ] || fetch "$base/tokenizer.json" "$MODEL_DIR/tokenizer.json" \
        || die "no tokenizer.json under $base"
      fetch "$base/config.json" "$MODEL_DIR/config.json" || say "no config.json under $base (optional)"
    fi
    ;;
  *)
    [ -d "$MODEL_SRC" ] || die "model directory not found: $MODEL_SRC (pass --model DIR|URL or set RERANKER_MODEL_SRC)"
    MODEL_DIR="$(cd "$MODEL_SRC" && pwd)"
    ;;
esac
for f in model.onnx tokenizer.json; do
  [ -f "$MODEL_DIR/$f" ] || die "$MODEL_DIR has no $f"
done
say "model: $MODEL_DIR"

# --- Python packages for the reference scorer (scripts/reference_score.py) ---
if [ "$WITH_PYTHON" = 1 ]; then
  # The Python reference scorer must tokenize with the same core as the Rust `tokenizers` crate
  # (0.23.2): 0.23.3 gives the odd token of a longest-first split to the other sequence, which
  # moves the logits of pairs where both sides are truncated.
  if ! python3 -c "import onnxruntime, tokenizers, numpy, jsonschema; assert tokenizers.__version__ == '$PY_TOKENIZERS_VERSION'" 2>/dev/null; then
    say "installing Python packages"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
      "onnxruntime==$ORT_VERSION" "tokenizers==$PY_TOKENIZERS_VERSION" numpy jsonschema >&2
  fi
  say "python: $(python3 -c 'import onnxruntime, tokenizers; print("onnxruntime", onnxruntime.__version__, "tokenizers", tokenizers.__version__)')"
fi

# --- tansu Kafka broker for the integration tests and the demo ---
if [ "$WITH_BROKER" = 1 ] && ! command -v tansu >/dev/null 2>&1; then
  # A build started elsewhere (another shell, an earlier run) would race ours for the same target; wait for it.
  if pgrep -f "cargo install --locked tansu" >/dev/null 2>&1; then
    say "a tansu build is already running; waiting for it"
    waited=0
    while pgrep -f "cargo install --locked tansu" >/dev/null 2>&1; do
      sleep 15; waited=$((waited + 15))
      if [ $((waited % 120)) -eq 0 ]; then say "still waiting for tansu build (${waited}s)"; fi
    done
  fi
  if ! command -v tansu >/dev/null 2>&1; then
    say "building tansu $TANSU_VERSION (cargo install, ~20 CPU-minutes)"
    cargo install --locked "tansu@$TANSU_VERSION" --features dynostore,libsql >&2
  fi
  command -v tansu >/dev/null 2>&1 || die "tansu is still not on PATH after cargo install"
fi
if [ "$WITH_BROKER" = 1 ]; then say "tansu: $(command -v tansu)"; fi

# --- cargo-fuzz for the bounded decoder fuzz run in scripts/test.sh (a crates.io package) ---
if [ "$WITH_FUZZ" = 1 ]; then
  if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
    say "installing cargo-fuzz (a few minutes, once)"
    cargo install --locked cargo-fuzz@0.13.2 >&2
  fi
  say "cargo-fuzz: $(command -v cargo-fuzz || echo "$HOME/.cargo/bin/cargo-fuzz")"
fi

# --- deploy checks (tests/deploy): Helm v4's engine as a library (no helm binary needed), the
# Kubernetes and compose-spec JSON schemas for offline validation, pytest. Pinned: the checks
# assert on what these render and report. ---
if [ "$WITH_HELM" = 1 ]; then
  if ! python3 - <<'PY' 2>/dev/null
import importlib.metadata as m
want = {"helm-python-sdk": "0.2.2", "kubernetes-validate": "1.37.0", "check-jsonschema": "0.39.0",
        "pytest": "9.2.0", "PyYAML": "6.0.3"}
assert all(m.version(k) == v for k, v in want.items()), "version mismatch"
PY
  then
    say "installing Python packages for the deploy checks (helm-python-sdk, kubernetes-validate, ...)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
      helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 \
      pytest==9.2.0 PyYAML==6.0.3 >&2
  fi
  say "helm engine: $(python3 -c 'import helm_python as h; print(h.helm_sdk_version())' 2>/dev/null)"
fi
# --- end deploy checks ---

# --- Environment for cargo build/test/run ---
{
  printf 'export ORT_DYLIB_PATH=%q\n' "$ORT_LIB"
  printf 'export RERANKER_MODEL__DIR=%q\n' "$MODEL_DIR"
  # shellcheck disable=SC2016  # expanded when env.sh is sourced, not now
  printf 'case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac\n'
} >"$CACHE/env.sh"
if [ "$PRINT_ENV" = 1 ]; then
  cat "$CACHE/env.sh"
else
  say "done; run: source $(printf '%q' "$CACHE/env.sh")"
fi
