"""Shared helpers for the deployment checks: the real binary, the repository's files, Helm rendering."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("RERANKER_BIN", ROOT / "target" / "release" / "reranker"))
CHART = ROOT / "helm" / "reranker"


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without RERANKER_* (scripts/setup.sh exports RERANKER_MODEL__DIR),
    plus `extra`: a test sees only the variables the deployment file under test sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    env.update(extra or {})
    return env


def reranker_config(config: Path | str | None = None, env: dict[str, str] | None = None) -> dict:
    """`reranker config [--config FILE]` with `env`: the effective configuration as the worker would
    load it. Unknown keys (in the file or as RERANKER_* variables) and bad values fail here."""
    if not BIN.is_file():
        raise AssertionError(f"{BIN} missing: run `cargo build --release --bins` first")
    args = [str(BIN), "config"]
    if config is not None:
        args += ["--config", str(config)]
    p = subprocess.run(args, env=clean_env(env), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"reranker config rejected it:\n{p.stderr}"
    return tomllib.loads(p.stdout)


def listen_port(cfg: dict) -> int:
    return int(cfg["http"]["listen"].rsplit(":", 1)[1])


def drain_ms(cfg: dict) -> int:
    return int(cfg["shutdown"]["drain_timeout_ms"])


def http_routes() -> set[str]:
    """Paths the worker serves, read from src/obs/http.rs's router."""
    src = (ROOT / "src" / "obs" / "http.rs").read_text()
    routes = set(re.findall(r'\.route\("([^"]+)"', src))
    assert {"/healthz", "/readyz", "/metrics"} <= routes, routes
    return routes


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def duration_seconds(s: str) -> float:
    """Compose/Prometheus durations: 30s, 1m30s, 500ms."""
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", s):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total
