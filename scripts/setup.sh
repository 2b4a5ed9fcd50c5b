#!/usr/bin/env bash
# Installs what the build, tests and demo need; safe to re-run (each step is skipped when already done).
#   scripts/setup.sh [--model DIR|URL|hf:REPO[@REV]] [--with-broker] [--with-python] [--with-prometheus] [--with-fuzz] [--with-helm] [--print-env]
# Progress goes to stderr so that `eval "$(scripts/setup.sh --print-env ...)"` sees only the env lines.
# Model env: RERANKER_MODEL_SRC (= --model), RERANKER_MODEL_REPO / RERANKER_MODEL_REVISION (hub default
# when ../shared has no model), RERANKER_HF_ENDPOINT (hub mirror), RERANKER_MODEL_SHA256 (pins model.onnx).
set -euo pipefail

ORT_VERSION=1.31.1
TANSU_VERSION=0.6.0
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY_TOKENIZERS_VERSION=0.23.2
CACHE="${RERANKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reranker}"
MODEL_SRC="${RERANKER_MODEL_SRC:-}"
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
    -h|--help) sed -n '2,6p' "$0" >&2; exit 0 ;;
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

# --- Model. --model/RERANKER_MODEL_SRC: a local directory (used in place), an http(s) URL of a
# HuggingFace-style folder, or hf:REPO[@REVISION]. Neither given: the small test model in
# ../shared/models when this checkout sits beside it, else the public cross-encoder from the hub.
# Downloads land in a temp dir, are verified, and only then move into the cache with a manifest
# (SHA256SUMS, written last): a cache dir without it is never taken as done. ---
MODEL_CACHE="$CACHE/models"
download() {  # download URL DEST: curl's -f fails on HTTP errors, and a body shorter than its
  # Content-Length fails too (curl exit 18), so a short download never passes as a file.
  local opts=(-fL --connect-timeout "${RERANKER_CONNECT_TIMEOUT:-5}" --retry 2 --retry-delay 1 -o "$2")
  if [ -t 2 ]; then
    curl "${opts[@]}" --progress-bar "$1" >&2
  else
    curl "${opts[@]}" -sS "$1" 2>&1 | sed 's/^/  /' >&2
    return "${PIPESTATUS[0]}"
  fi
}
check_graph() {  # check_graph FILE: the ONNX graph's input/output names, read from the protobuf
  # directly (no onnx package): ModelProto.graph = 7, GraphProto.input = 11 / output = 12,
  # ValueInfoProto.name = 1. Initializers are skipped by length, so the weights are never parsed.
  python3 - "$1" <<'PY'
import mmap, sys
def varint(b, i):
    r = s = 0
    while True:
        c = b[i]; i += 1
        r |= (c & 0x7F) << s; s += 7
        if c < 0x80:
            return r, i
def fields(b, i, end):
    while i < end:
        tag, i = varint(b, i)
        f, wt = tag >> 3, tag & 7
        if wt == 0:
            v, i = varint(b, i); yield f, v, None
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            n, i = varint(b, i)
            if i + n > end:
                raise ValueError("field runs past the end of the file (truncated?)")
            yield f, i, i + n; i += n
        else:
            raise ValueError(f"wire type {wt} at byte {i}: not an ONNX protobuf")
with open(sys.argv[1], "rb") as fh:
    b = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        graph = [(s, e) for f, s, e in fields(b, 0, len(b)) if f == 7 and e is not None]
        if not graph:
            raise ValueError("no graph")
        names = {11: [], 12: []}
        for f, s, e in fields(b, *graph[-1]):
            if f in names and e is not None:
                names[f] += [bytes(b[s2:e2]).decode() for f2, s2, e2 in fields(b, s, e) if f2 == 1 and e2 is not None]
    except (ValueError, IndexError, UnicodeDecodeError) as ex:
        sys.exit(f"{sys.argv[1]} is not a readable ONNX model: {ex}")
ins, outs = names[11], names[12]
missing = [n for n in ("input_ids", "attention_mask") if n not in ins] + [n for n in ("logits",) if n not in outs]
if missing:
    sys.exit(f"ONNX graph lacks {missing} (inputs {ins}, outputs {outs}): not a sequence-classification cross-encoder export")
print(f"  onnx graph: inputs {', '.join(ins)}; outputs {', '.join(outs)}", file=sys.stderr)
PY
}
check_tokenizer() {  # check_tokenizer FILE: parses, has a model section; loads it when `tokenizers` is installed
  python3 - "$1" <<'PY'
import json, sys
try:
    t = json.load(open(sys.argv[1], encoding="utf-8"))
    kind = t["model"]["type"]
except Exception as ex:
    sys.exit(f"{sys.argv[1]} is not a tokenizers JSON file: {ex!r}")
try:
    import tokenizers
except ImportError:
    print(f"  tokenizer: {kind} (JSON checked; the Python tokenizers package is not installed)", file=sys.stderr)
    sys.exit(0)
n = len(tokenizers.Tokenizer.from_file(sys.argv[1]).encode("a query", "a passage").ids)
print(f"  tokenizer: {kind}, loads, a sample pair is {n} tokens", file=sys.stderr)
PY
}
# fetch_model DEST SOURCE_LABEL BASE_URL MODEL_PATHS CONFIG(required|optional)
fetch_model() {
  local dest="$1" label="$2" base="$3" model_paths="$4" config="$5" tmp p ok got
  mkdir -p "$MODEL_CACHE"
  tmp="$(mktemp -d "$MODEL_CACHE/.download.XXXXXX")"
  # shellcheck disable=SC2064  # expand $tmp now: it is this call's dir
  trap "rm -rf '$tmp'" EXIT
  say "downloading model $label into $dest"
  ok=0
  for p in $model_paths; do
    say "  $base/$p"
    if download "$base/$p" "$tmp/model.onnx"; then ok=1; break; fi
  done
  [ "$ok" = 1 ] || fetch_failed "cannot download ${model_paths// / or } under $base"
  say "  $base/tokenizer.json"
  download "$base/tokenizer.json" "$tmp/tokenizer.json" || fetch_failed "cannot download $base/tokenizer.json"
  say "  $base/config.json"
  if ! download "$base/config.json" "$tmp/config.json"; then
    [ "$config" = optional ] || fetch_failed "cannot download $base/config.json"
    rm -f "$tmp/config.json"; say "  (no config.json; optional for a URL source)"
  fi
  say "verifying the download"
  got="$(sha256sum "$tmp/model.onnx" | cut -d' ' -f1)"
  if [ -n "${RERANKER_MODEL_SHA256:-}" ] && [ "$got" != "${RERANKER_MODEL_SHA256,,}" ]; then
    die "model.onnx from $label has SHA-256 $got, not RERANKER_MODEL_SHA256=$RERANKER_MODEL_SHA256; nothing was cached"
  fi
  check_graph "$tmp/model.onnx" || die "model.onnx from $label failed the graph check; nothing was cached"
  check_tokenizer "$tmp/tokenizer.json" || die "tokenizer.json from $label failed to load; nothing was cached"
  check_with_binary "$tmp" || die "reranker check-model failed on the model from $label; nothing was cached"
  (cd "$tmp" && sha256sum -- *.json model.onnx >SHA256SUMS.part && mv SHA256SUMS.part SHA256SUMS)
  printf 'source %s\nfetched %s\n' "$label" "$(date -u +%FT%TZ)" >"$tmp/SOURCE"
  rm -rf "$dest"; mkdir -p "$(dirname "$dest")"
  mv "$tmp" "$dest"
  trap - EXIT
  say "model.onnx sha256 $got (recorded with the others in $dest/SHA256SUMS)"
}
fetch_failed() {  # the hub or URL did not deliver: say what to do instead
  die "$1; nothing was cached. Pass --model DIR|URL|hf:REPO[@REV] (an exported cross-encoder: model.onnx + tokenizer.json) or set RERANKER_MODEL_SRC; RERANKER_HF_ENDPOINT points at a hub mirror"
}
check_with_binary() {  # runs `reranker check-model` when the binary is already built (building it
  # here would take minutes on a fresh clone; the worker checks the same I/O again at start)
  local bin="${RERANKER_BIN:-$REPO_ROOT/target/release/reranker}"
  if [ ! -x "$bin" ]; then
    say "  ($bin not built yet: skipping reranker check-model; the worker checks the graph when it loads it)"
    return 0
  fi
  say "  $bin check-model"
  ORT_DYLIB_PATH="$ORT_LIB" "$bin" check-model --model "$1" 2>&1 | sed 's/^/    /' >&2
  return "${PIPESTATUS[0]}"
}
use_cached() {  # use_cached DIR: a complete download (manifest present, files match it)
  [ -f "$1/SHA256SUMS" ] || return 1
  (cd "$1" && sha256sum -c --quiet --status SHA256SUMS) || { say "cached model in $1 does not match its manifest; fetching again"; return 1; }
  if [ -n "${RERANKER_MODEL_SHA256:-}" ]; then
    local got; got="$(grep ' model.onnx$' "$1/SHA256SUMS" | cut -d' ' -f1)"
    [ "$got" = "${RERANKER_MODEL_SHA256,,}" ] \
      || die "cached model.onnx in $1 has SHA-256 $got, not RERANKER_MODEL_SHA256=$RERANKER_MODEL_SHA256 (remove the dir to fetch again)"
  fi
}
hub_model() {  # hub_model REPO REVISION
  local endpoint="${RERANKER_HF_ENDPOINT:-https://huggingface.co}"
  # One dir per repo and revision, named so that the worker's default model name (the dir's
  # name) says which: cross-encoder--ms-marco-MiniLM-L6-v2@main.
  MODEL_DIR="$MODEL_CACHE/hf/${1//\//--}@$2"
  if use_cached "$MODEL_DIR"; then
    say "model: $1@$2 from the cache (verified against $MODEL_DIR/SHA256SUMS)"
  else
    fetch_model "$MODEL_DIR" "$1@$2 ($endpoint)" "${endpoint%/}/$1/resolve/$2" "onnx/model.onnx" required
  fi
}
BUNDLED_MODEL="$REPO_ROOT/../shared/models/minilm-l6-ce"
case "$MODEL_SRC" in
  "")
    if [ -d "$BUNDLED_MODEL" ]; then
      MODEL_DIR="$(cd "$BUNDLED_MODEL" && pwd)"
    else
      repo="${RERANKER_MODEL_REPO:-cross-encoder/ms-marco-MiniLM-L6-v2}" rev="${RERANKER_MODEL_REVISION:-main}"
      say "no --model given and no bundled test model at $BUNDLED_MODEL: using $repo@$rev from the hub"
      hub_model "$repo" "$rev"
    fi
    ;;
  hf:*)
    spec="${MODEL_SRC#hf:}"
    case "$spec" in *@*) hub_model "${spec%@*}" "${spec##*@}" ;; *) hub_model "$spec" "${RERANKER_MODEL_REVISION:-main}" ;; esac
    ;;
  http://*|https://*)
    base="${MODEL_SRC%/}"
    MODEL_DIR="$MODEL_CACHE/$(printf '%s' "$base" | sed -E 's#^https?://##; s#[^A-Za-z0-9._-]+#_#g')"
    if use_cached "$MODEL_DIR"; then
      say "model: $base from the cache (verified against $MODEL_DIR/SHA256SUMS)"
    else
      fetch_model "$MODEL_DIR" "$base" "$base" "model.onnx onnx/model.onnx" optional
    fi
    ;;
  *)
    [ -d "$MODEL_SRC" ] || die "model directory not found: $MODEL_SRC (pass --model DIR|URL|hf:REPO[@REV] or set RERANKER_MODEL_SRC)"
    MODEL_DIR="$(cd "$MODEL_SRC" && pwd)"
    ;;
esac
for f in model.onnx tokenizer.json; do
  [ -f "$MODEL_DIR/$f" ] || die "$MODEL_DIR has no $f"
done
say "model: $MODEL_DIR"

# --- Python packages for the reference scorer (scripts/reference_score.py) and the Python peer of
# `reranker bench --python-peer` (scripts/python_peer.py; confluent-kafka's wheel bundles librdkafka) ---
CONFLUENT_KAFKA_VERSION=2.16.1
if [ "$WITH_PYTHON" = 1 ]; then
  # The Python reference scorer must tokenize with the same core as the Rust `tokenizers` crate
  # (0.23.2): 0.23.3 gives the odd token of a longest-first split to the other sequence, which
  # moves the logits of pairs where both sides are truncated.
  if ! python3 -c "import onnxruntime, tokenizers, numpy, jsonschema; assert tokenizers.__version__ == '$PY_TOKENIZERS_VERSION'" 2>/dev/null; then
    say "installing Python packages"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
      "onnxruntime==$ORT_VERSION" "tokenizers==$PY_TOKENIZERS_VERSION" numpy jsonschema >&2
  fi
  if ! python3 -c "import confluent_kafka; assert confluent_kafka.__version__ == '$CONFLUENT_KAFKA_VERSION'" 2>/dev/null; then
    say "installing confluent-kafka $CONFLUENT_KAFKA_VERSION (the Python peer's Kafka client)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
      "confluent-kafka==$CONFLUENT_KAFKA_VERSION" >&2
  fi
  say "python: $(python3 -c 'import onnxruntime, tokenizers, confluent_kafka; print("onnxruntime", onnxruntime.__version__, "tokenizers", tokenizers.__version__, "confluent-kafka", confluent_kafka.__version__, "librdkafka", confluent_kafka.libversion()[0])')"
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
    log="$CACHE/tansu-build.log"
    say "building tansu $TANSU_VERSION, the Kafka-compatible broker that the demo and the tests start"
    say "  (cargo install, once: ~20 CPU-minutes, ~10 min on 2 cores; log $log)"
    say "  a first look needs no broker: scripts/demo.sh --broker mock"
    # cargo's own progress bar is one line that says little when redrawn for ten minutes; a
    # line every 30 s with the crate count and the crate at hand shows that it moves.
    cargo install --locked "tansu@$TANSU_VERSION" --features dynostore,libsql >"$log" 2>&1 &
    pid=$! start=$SECONDS next=30
    while kill -0 "$pid" 2>/dev/null; do
      sleep 2
      if [ $((SECONDS - start)) -ge "$next" ]; then
        next=$((next + 30))
        n=$(grep -c '^ *Compiling ' "$log" || true)
        now=$(grep '^ *Compiling ' "$log" | tail -n 1 | sed -E 's/^ *Compiling +//')
        say "  tansu build: $(((SECONDS - start) / 60))m$(((SECONDS - start) % 60))s, $n crates compiled${now:+, now $now}"
      fi
    done
    if ! wait "$pid"; then
      tail -n 30 "$log" >&2
      die "tansu build failed (full log: $log)"
    fi
    say "  tansu built in $(((SECONDS - start) / 60))m$(((SECONDS - start) % 60))s"
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
