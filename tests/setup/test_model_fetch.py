"""scripts/setup.sh's model fetch against a local server laid out like the Hugging Face hub
(`<endpoint>/<repo>/resolve/<revision>/<path>`): there is no internet here, and the failure cases
(a truncated body, a wrong checksum, a missing file, an unreachable hub) are ones a real hub
cannot be made to produce on demand.

setup.sh runs from a copy of the checkout placed where `../shared` does not exist, which is what
a fresh clone elsewhere looks like; its cache is a temp dir (ONNX Runtime linked in from the real
cache so that nothing is downloaded from PyPI)."""

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_MODEL = REPO.parent / "shared" / "models" / "minilm-l6-ce"
ORT_VERSION = "1.31.1"
HUB_REPO = "cross-encoder/ms-marco-MiniLM-L6-v2"
REVISION = "0123abcd"  # pinned: the server answers only under this revision
CACHED = Path("models/hf") / f"cross-encoder--ms-marco-MiniLM-L6-v2@{REVISION}"


def ort_library():
    p = os.environ.get("ORT_DYLIB_PATH")
    if p and Path(p).is_file():
        return Path(p)
    p = Path.home() / ".cache/reranker/ort" / f"libonnxruntime.so.{ORT_VERSION}"
    return p if p.is_file() else None


class Hub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files  # URL path -> bytes
        self.truncate = set()
        self.missing = set()
        self.hits = []

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        hub = self.server
        hub.hits.append(self.path)
        body = hub.files.get(self.path)
        if body is None or self.path in hub.missing:
            self.send_error(404, "Entry not found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in hub.truncate:
            # Half the promised body, then the connection closes: what a dropped download looks like.
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def model_files():
    if not SHARED_MODEL.is_dir():
        pytest.skip(f"{SHARED_MODEL} (served as the hub's files) is absent")
    # The int8 graph stands in for the hub's onnx/model.onnx: same I/O, a quarter of the bytes.
    return {
        "onnx/model.onnx": (SHARED_MODEL / "model_int8.onnx").read_bytes(),
        "tokenizer.json": (SHARED_MODEL / "tokenizer.json").read_bytes(),
        "config.json": (SHARED_MODEL / "config.json").read_bytes(),
    }


@pytest.fixture
def hub(model_files):
    files = {f"/{HUB_REPO}/resolve/{REVISION}/{k}": v for k, v in model_files.items()}
    # A plain folder for the --model URL path: model.onnx at its root, no config.json.
    files["/plain/model.onnx"] = model_files["onnx/model.onnx"]
    files["/plain/tokenizer.json"] = model_files["tokenizer.json"]
    server = Hub(files)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def clone(tmp_path):
    """A checkout with no ../shared beside it, and a private cache holding only ONNX Runtime."""
    lib = ort_library()
    if lib is None:
        pytest.skip("ONNX Runtime library not found (run scripts/setup.sh)")
    root = tmp_path / "elsewhere" / "reranker"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    cache = tmp_path / "cache"
    (cache / "ort").mkdir(parents=True)
    (cache / "ort" / f"libonnxruntime.so.{ORT_VERSION}").symlink_to(lib)
    assert not (root.parent.parent / "shared").exists()
    return root, cache


def run_setup(clone, hub_endpoint, *args, env=None, bin=None):
    root, cache = clone
    e = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    e.update(
        RERANKER_CACHE=str(cache),
        RERANKER_HF_ENDPOINT=hub_endpoint,
        RERANKER_MODEL_REVISION=REVISION,
        # No binary unless a test asks for it: check-model is slow and covered once.
        RERANKER_BIN=str(bin or "/nonexistent/reranker"),
    )
    e.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run(
        ["bash", str(root / "scripts" / "setup.sh"), "--print-env", *args],
        env=e, capture_output=True, text=True, timeout=300,
    )
    p.elapsed = time.monotonic() - t0
    return p


def nothing_cached(cache):
    models = cache / "models"
    left = sorted(str(p.relative_to(cache)) for p in models.rglob("*")) if models.exists() else []
    # The hub's parent folders may exist; no file, no temp dir may remain.
    return [p for p in left if (cache / p).is_file() or ".download." in p]


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def reranker_binary():
    b = Path(os.environ.get("RERANKER_BIN", REPO / "target" / "release" / "reranker"))
    return b if b.is_file() else None


def test_fetches_verifies_and_caches_a_pinned_revision(clone, hub, model_files):
    _, cache = clone
    binary = reranker_binary()
    p = run_setup(clone, hub.endpoint, bin=binary)
    assert p.returncode == 0, p.stderr
    dest = cache / CACHED
    assert f"export RERANKER_MODEL__DIR={dest}" in p.stdout
    assert "downloading model cross-encoder/ms-marco-MiniLM-L6-v2@0123abcd" in p.stderr
    assert "onnx graph: inputs input_ids, attention_mask, token_type_ids; outputs logits" in p.stderr
    if binary:
        assert "check-model" in p.stderr and "activation sigmoid" in p.stderr, p.stderr
    files = {"model.onnx": "onnx/model.onnx", "tokenizer.json": "tokenizer.json", "config.json": "config.json"}
    for name, served in files.items():
        assert (dest / name).read_bytes() == model_files[served]
    manifest = dict(reversed(line.split("  ")) for line in (dest / "SHA256SUMS").read_text().splitlines())
    assert manifest == {n: sha256(model_files[s]) for n, s in files.items()}
    assert not list((cache / "models").glob(".download.*"))

    # Done before: taken from the cache (checked against its manifest), nothing downloaded.
    hits = len(hub.hits)
    p = run_setup(clone, hub.endpoint, env={"RERANKER_MODEL_SHA256": manifest["model.onnx"]})
    assert p.returncode == 0, p.stderr
    assert "from the cache" in p.stderr and len(hub.hits) == hits

    # A cached file changed behind the manifest's back: fetched again.
    (dest / "tokenizer.json").write_text("{}")
    p = run_setup(clone, hub.endpoint)
    assert p.returncode == 0, p.stderr
    assert "does not match its manifest" in p.stderr
    assert (dest / "tokenizer.json").read_bytes() == model_files["tokenizer.json"]


def test_a_pinned_checksum_is_checked(clone, hub, model_files):
    _, cache = clone
    good = sha256(model_files["onnx/model.onnx"])
    p = run_setup(clone, hub.endpoint, env={"RERANKER_MODEL_SHA256": "0" * 64})
    assert p.returncode != 0
    assert f"has SHA-256 {good}, not RERANKER_MODEL_SHA256={'0' * 64}" in p.stderr
    assert nothing_cached(cache) == []
    p = run_setup(clone, hub.endpoint, env={"RERANKER_MODEL_SHA256": good.upper()})
    assert p.returncode == 0, p.stderr


def test_a_truncated_download_is_an_error_and_leaves_nothing(clone, hub):
    _, cache = clone
    hub.truncate.add(f"/{HUB_REPO}/resolve/{REVISION}/onnx/model.onnx")
    p = run_setup(clone, hub.endpoint)
    assert p.returncode != 0
    assert "curl: (18)" in p.stderr, p.stderr  # curl's own check of Content-Length
    assert "cannot download onnx/model.onnx" in p.stderr
    assert nothing_cached(cache) == []


def test_a_missing_file_is_named(clone, hub):
    _, cache = clone
    hub.missing.add(f"/{HUB_REPO}/resolve/{REVISION}/tokenizer.json")
    p = run_setup(clone, hub.endpoint)
    assert p.returncode != 0
    assert "404" in p.stderr
    assert f"cannot download {hub.endpoint}/{HUB_REPO}/resolve/{REVISION}/tokenizer.json" in p.stderr
    assert nothing_cached(cache) == []


def test_not_a_cross_encoder_is_refused(clone, hub, model_files):
    _, cache = clone
    hub.files[f"/{HUB_REPO}/resolve/{REVISION}/onnx/model.onnx"] = model_files["config.json"]
    p = run_setup(clone, hub.endpoint)
    assert p.returncode != 0
    assert "not a readable ONNX model" in p.stderr or "ONNX graph lacks" in p.stderr, p.stderr
    assert nothing_cached(cache) == []


def test_a_dir_without_manifest_is_not_taken_as_done(clone, hub, model_files):
    _, cache = clone
    dest = cache / CACHED
    dest.mkdir(parents=True)
    (dest / "model.onnx").write_bytes(b"half a model")
    (dest / "tokenizer.json").write_text("{}")
    p = run_setup(clone, hub.endpoint)
    assert p.returncode == 0, p.stderr
    assert (dest / "model.onnx").read_bytes() == model_files["onnx/model.onnx"]
    assert (dest / "SHA256SUMS").is_file()


def test_an_unreachable_hub_stops_at_once_naming_the_ways_out(clone):
    _, cache = clone
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = run_setup(clone, f"http://127.0.0.1:{port}")
    assert p.returncode != 0
    assert p.elapsed < 15, p.elapsed
    last = p.stderr.strip().splitlines()[-1]
    assert "--model" in last and "RERANKER_MODEL_SRC" in last, last
    assert "no bundled test model" in p.stderr
    assert nothing_cached(cache) == []


def test_a_url_folder_still_works(clone, hub, model_files):
    _, cache = clone
    p = run_setup(clone, hub.endpoint, "--model", f"{hub.endpoint}/plain/")
    assert p.returncode == 0, p.stderr
    dirs = [d for d in (cache / "models").iterdir() if not d.name.startswith(".")]
    assert len(dirs) == 1 and (dirs[0] / "SHA256SUMS").is_file(), dirs
    assert (dirs[0] / "model.onnx").read_bytes() == model_files["onnx/model.onnx"]
    assert not (dirs[0] / "config.json").exists()
    assert f"export RERANKER_MODEL__DIR={dirs[0]}" in p.stdout
