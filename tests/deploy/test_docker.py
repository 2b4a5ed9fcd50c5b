"""The Dockerfiles against the code and scripts/setup.sh, statically (no Docker engine here), plus
the parts that can run without one: the ORT extraction on the real wheel and the HEALTHCHECK
command against the real worker."""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploylib import BIN, ROOT, clean_env, free_port, http_routes, listen_port, reranker_config

DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "cuda": ROOT / "docker" / "Dockerfile.cuda"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines()
                                         if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args_of(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for w, a in instructions(path) if w == "ARG" and "=" in a)


def setup_ort_version() -> str:
    return re.search(r"^ORT_VERSION=(\S+)", (ROOT / "scripts" / "setup.sh").read_text(), re.M).group(1)


def runtime_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def baked_config(path: Path) -> Path:
    (src,) = [a.split()[0] for w, a in runtime_stage(path)
              if w == "COPY" and a.split()[-1] == "/etc/reranker/reranker.toml"]
    return ROOT / src


def healthcheck_cmd(path: Path) -> list[str]:
    import json
    (hc,) = [a for w, a in instructions(path) if w == "HEALTHCHECK"]
    return json.loads(hc[hc.index("CMD") + 3:].strip())


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_ort_version_matches_setup(kind):
    assert args_of(DOCKERFILES[kind])["ORT_VERSION"] == setup_ort_version()


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_stage(kind):
    path = DOCKERFILES[kind]
    rt = runtime_stage(path)
    env = " ".join(a for w, a in rt if w == "ENV")
    version = args_of(path)["ORT_VERSION"]
    dylib = re.search(r"ORT_DYLIB_PATH=(\S+)", env).group(1).replace("${ORT_VERSION}", version)
    copied = [a.split()[-1] for w, a in rt if w == "COPY" and "--from=ort" in a]
    assert copied and dylib.startswith(copied[0]) and dylib.endswith(f"libonnxruntime.so.{version}")
    (user,) = [a for w, a in rt if w == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot can check it)"
    assert [a for w, a in rt if w == "STOPSIGNAL"] == ["SIGTERM"]
    assert runtime_stage(path)[0][1].startswith(("${RUNTIME_IMAGE}", "${CUDA_IMAGE}"))
    images = args_of(path)
    if kind == "cpu":
        assert "slim" in images["RUNTIME_IMAGE"]
    else:
        assert "cudnn" in images["CUDA_IMAGE"] and "runtime" in images["CUDA_IMAGE"]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_build_stage_is_locked_release(kind):
    path = DOCKERFILES[kind]
    runs = " ".join(a for w, a in instructions(path) if w == "RUN")
    assert "cargo build --release --locked" in runs
    features = "--features cuda" in runs
    assert features == (kind == "cuda")
    if features:
        assert re.search(r"^cuda\s*=", (ROOT / "Cargo.toml").read_text(), re.M)
    pkg = "onnxruntime-gpu" if kind == "cuda" else "onnxruntime"
    assert f'pip download --quiet --no-deps --only-binary=:all: "{pkg}==${{ORT_VERSION}}"' in runs


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_copy_sources_exist_and_are_not_dockerignored(kind):
    path = DOCKERFILES[kind]
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    args = args_of(path)
    for w, a in instructions(path):
        if w != "COPY" or a.startswith("--from"):
            continue
        for src in a.split()[:-1]:
            src = src.replace("${MODEL_DIR}", args["MODEL_DIR"]).rstrip("/")
            assert (ROOT / src).exists(), src
            assert not any(src == i or src.startswith(i + "/") for i in ignored), src


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_baked_config_loads_and_matches_expose_and_healthcheck(kind):
    path = DOCKERFILES[kind]
    cfg = reranker_config(baked_config(path))
    port = listen_port(cfg)
    assert [a for w, a in instructions(path) if w == "EXPOSE"] == [str(port)]
    hc = " ".join(healthcheck_cmd(path))
    assert f"/dev/tcp/127.0.0.1/{port}" in hc
    assert re.search(r"GET (\S+) HTTP", hc).group(1) in http_routes()
    # The model lands where the config looks: MODEL_DIR is copied to model.dir.
    (dest,) = [a.split()[-1] for w, a in runtime_stage(path) if w == "COPY" and "${MODEL_DIR}" in a]
    assert dest.rstrip("/") == cfg["model"]["dir"]
    assert cfg["model"]["device"] == ("cuda" if kind == "cuda" else "cpu")
    cmd = [a for w, a in instructions(path) if w == "CMD"][0]
    assert "/etc/reranker/reranker.toml" in cmd


def test_extract_ort_on_the_real_wheel(tmp_path):
    version = setup_ort_version()
    cache = Path(os.environ.get("RERANKER_CACHE", Path.home() / ".cache" / "reranker"))
    wheels = glob.glob(str(cache / "ort-wheel" / f"onnxruntime-{version}-*.whl"))
    if not wheels:
        pytest.skip("no onnxruntime wheel in the setup cache (scripts/setup.sh fetches it)")
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    os.symlink(wheels[0], wheel_dir / Path(wheels[0]).name)
    dest = tmp_path / "lib"
    subprocess.run(["python3", str(ROOT / "docker" / "extract_ort.py"), str(wheel_dir), str(dest),
                    version], check=True, capture_output=True)
    lib = dest / f"libonnxruntime.so.{version}"
    assert lib.stat().st_size > 1_000_000
    assert os.readlink(dest / "libonnxruntime.so") == lib.name


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_healthcheck_command_against_the_real_worker():
    """The image's config and HEALTHCHECK, run as-is but for the port, on this machine: a worker
    whose broker is unreachable is alive (/healthz 200, the HEALTHCHECK passes) and not ready."""
    if not os.environ.get("ORT_DYLIB_PATH"):
        pytest.skip("ORT_DYLIB_PATH unset (scripts/test.sh sets it)")
    model = Path(os.environ.get("RERANKER_MODEL__DIR", ROOT.parent / "shared" / "models" / "minilm-l6-ce"))
    port, dead_broker = free_port(), free_port()
    env = clean_env({"RERANKER_KAFKA__BROKERS": f"127.0.0.1:{dead_broker}",
                     "RERANKER_MODEL__DIR": str(model),
                     "RERANKER_HTTP__LISTEN": f"127.0.0.1:{port}",
                     "RERANKER_MODEL__INTRA_OP_THREADS": "1"})
    config = baked_config(DOCKERFILES["cpu"])
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([str(BIN), "run", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.time() + 120
            while True:
                assert proc.poll() is None, "worker exited early"
                try:
                    if _get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                        break
                except OSError:
                    pass
                assert time.time() < deadline, "no /healthz within 120 s"
                time.sleep(0.5)
            cmd = [c.replace("/9464", f"/{port}") for c in healthcheck_cmd(DOCKERFILES["cpu"])]
            assert subprocess.run(cmd, timeout=10).returncode == 0
            status, body = _get(f"http://127.0.0.1:{port}/readyz")
            assert status == 503 and body.startswith("not ready"), (status, body)
            # The same command fails when nothing listens (the check is not vacuous).
            bad = [c.replace("/9464", f"/{dead_broker}") for c in healthcheck_cmd(DOCKERFILES["cpu"])]
            assert subprocess.run(bad, timeout=10, stderr=subprocess.DEVNULL).returncode != 0
            proc.send_signal(signal.SIGTERM)  # STOPSIGNAL: the drain ends with exit 0
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
        print(tail)


# What debian:bookworm-slim plus the runtime stage's packages (libssl3, libstdc++6) provide, and
# Ubuntu 24.04 (CUDA image, libssl3t64) as well.
RUNTIME_SONAMES = {"libz.so.1", "libssl.so.3", "libcrypto.so.3", "libgcc_s.so.1", "libm.so.6",
                   "libc.so.6", "ld-linux-x86-64.so.2", "libstdc++.so.6", "libdl.so.2",
                   "libpthread.so.0", "librt.so.1"}


def test_binary_links_only_what_the_runtime_images_have():
    """A new -sys dependency linking another shared library would build and then fail to start
    in the slim image; catch it here."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed")
    out = subprocess.run([readelf, "-d", str(BIN)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    assert needed and needed <= RUNTIME_SONAMES, needed - RUNTIME_SONAMES
