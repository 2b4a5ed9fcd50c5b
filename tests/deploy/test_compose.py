"""docker-compose.yml and the files it mounts (Prometheus, OTel collector, Grafana provisioning,
sample events) against the code: env vars, ports, topics, paths. No Docker engine is needed (or
available on the CI machines); the worker's side is checked with the real binary."""
from __future__ import annotations

import json
import urllib.parse
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest

from deploylib import (ROOT, duration_seconds, drain_ms, http_routes, listen_port, load_yaml,
                       reranker_config)

COMPOSE = load_yaml(ROOT / "docker-compose.yml")
SERVICES = COMPOSE["services"]


def mounts(service: str) -> dict[str, str]:
    """Container path -> host path (relative to the repository) of a service's bind mounts."""
    out = {}
    for v in SERVICES[service].get("volumes", []):
        v = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v)  # ${MODEL_DIR:-default} -> default
        host, container = v.split(":")[:2]
        out[container] = host
    return out


def script(service: str) -> str:
    cmd = SERVICES[service]["command"]
    return cmd if isinstance(cmd, str) else " ".join(cmd)


@pytest.fixture(scope="module")
def worker():
    """The worker service's effective configuration: its mounted config file with its env."""
    svc = SERVICES["reranker"]
    cmd = svc["command"]
    config_in_container = cmd[cmd.index("--config") + 1]
    host_file = ROOT / mounts("reranker")[config_in_container]
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert all(k.startswith("RERANKER_") for k in env), env
    return reranker_config(host_file, env)


def test_compose_file_is_valid_compose_spec():
    # check-jsonschema ships the official compose-spec JSON schema.
    p = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                        "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_worker_env_vars_are_config_keys_and_take_effect(worker):
    # reranker_config failing on an unknown key is the first half; the values landing is the second.
    env = SERVICES["reranker"]["environment"]
    for k, v in env.items():
        path = k.removeprefix("RERANKER_").lower().split("__")
        node = worker
        for p in path:
            node = node[p]
        # Env values are strings; the effective config has them typed (TOML booleans, numbers).
        shown = str(node).lower() if isinstance(node, bool) else str(node)
        assert shown == str(v), (k, node, v)


def test_worker_reaches_the_compose_broker(worker):
    host, port = worker["kafka"]["brokers"].split(":")
    assert host in SERVICES, f"kafka.brokers names {host}, not a compose service"
    kafka_env = SERVICES[host]["environment"]
    assert f"PLAINTEXT://{host}:{port}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT://:{port}" in kafka_env["KAFKA_LISTENERS"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "zookeeper" not in SERVICES


def test_topics_created_match_worker_config(worker):
    created = dict(re.findall(r"--create --if-not-exists --topic (\S+) --partitions (\d+)",
                              script("kafka-init")))
    k = worker["kafka"]
    assert set(created) == {k["input_topic"], k["output_topic"], k["dlq_topic"]}
    assert SERVICES["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    # The producer feeds the input topic; the tail reads output and dead letters.
    assert re.findall(r"--topic (\S+)", script("producer")) == [k["input_topic"]]
    include = re.search(r"--include '([^']+)'", script("reranked-tail")).group(1)
    assert set(include.split("|")) == {k["output_topic"], k["dlq_topic"]}


def test_metrics_port_and_healthcheck_match_http_listen(worker):
    port = listen_port(worker)
    svc = SERVICES["reranker"]
    assert [str(p) for p in svc["ports"]] == [str(port)]
    hc = " ".join(svc["healthcheck"]["test"])
    assert f"/dev/tcp/127.0.0.1/{port}" in hc
    path = re.search(r"GET (\S+) HTTP", hc).group(1)
    assert path == "/healthz" and path in http_routes()


def test_model_mount_is_model_dir(worker):
    m = mounts("reranker")
    assert worker["model"]["dir"] in m
    assert (ROOT / m[worker["model"]["dir"]] / "model.onnx").is_file()


def test_stop_grace_period_exceeds_drain(worker):
    svc = SERVICES["reranker"]
    assert svc["stop_signal"] == "SIGTERM"
    assert duration_seconds(svc["stop_grace_period"]) * 1000 > drain_ms(worker)


def test_prometheus_scrapes_the_worker(worker):
    prom_svc = SERVICES["prometheus"]
    cfg_path = next(a.split("=", 1)[1] for a in prom_svc["command"] if a.startswith("--config.file="))
    host_file = ROOT / mounts("prometheus")[cfg_path]
    prom = load_yaml(host_file)
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "reranker")
    assert job["metrics_path"] in http_routes()
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["reranker"] and sd["port"] == listen_port(worker)
    # The collector's own metrics endpoint is what service.telemetry opens.
    otel = load_yaml(ROOT / "deploy" / "otel-collector.yaml")
    reader = otel["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    coll = next(j for j in prom["scrape_configs"] if j["job_name"] == "otel-collector")
    assert coll["static_configs"][0]["targets"] == [f"otel-collector:{reader['port']}"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup.sh --with-prometheus)")
    p = subprocess.run([promtool, "check", "config", str(host_file)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_otel_collector_config_is_consistent(worker):
    svc = SERVICES["otel-collector"]
    cfg_path = next(a.split("=", 1)[1] for a in svc["command"] if a.startswith("--config="))
    otel = load_yaml(ROOT / mounts("otel-collector")[cfg_path])
    job = otel["receivers"]["prometheus"]["config"]["scrape_configs"][0]
    assert job["metrics_path"] in http_routes()
    assert job["dns_sd_configs"][0]["port"] == listen_port(worker)
    svc_ext = otel["service"]
    for ext in svc_ext["extensions"]:
        assert ext in otel["extensions"]
    for name, pipe in svc_ext["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipe.get(kind, []):
                assert comp in otel[kind], f"pipeline {name} uses undefined {kind[:-1]} {comp}"
    # The worker exports its spans to the collector's OTLP/HTTP receiver, which a traces pipeline reads.
    assert worker["otel"]["traces"] is True
    url = urllib.parse.urlsplit(worker["otel"]["endpoint"])
    http_recv = otel["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert (url.scheme, url.hostname) == ("http", "otel-collector")
    assert str(url.port) == http_recv.rsplit(":", 1)[1]
    assert "otlp" in svc_ext["pipelines"]["traces"]["receivers"]
    published = {str(p).split(":")[0] for p in svc["ports"]}
    assert {"4317", "4318", otel["extensions"]["health_check"]["endpoint"].rsplit(":", 1)[1]} <= published


def test_grafana_provisions_the_dashboard():
    m = mounts("grafana")
    prov = ROOT / m["/etc/grafana/provisioning"]
    (provider,) = load_yaml(prov / "dashboards" / "reranker.yaml")["providers"]
    dash_dir = provider["options"]["path"]
    assert m[dash_dir] == "./helm/dashboards"
    dash = json.loads((ROOT / "helm" / "dashboards" / "reranker.json").read_text())
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/reranker.json"
    (ds,) = load_yaml(prov / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    # The dashboard picks its data source through a variable of type prometheus.
    var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert var["query"] == ds["type"]
    host, port = re.match(r"http://([^:]+):(\d+)$", ds["url"]).groups()
    assert host in SERVICES and f"{port}:{port}" in SERVICES[host]["ports"]


def test_sample_events_follow_the_input_schema():
    schema = json.loads((ROOT / "schemas" / "retrieval-result.v1.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    lines = (ROOT / "deploy" / "sample" / "retrieval-events.txt").read_text().splitlines()
    bad = []
    for line in lines:
        key, payload = line.split("\t", 1)
        try:
            ev = json.loads(payload)
        except json.JSONDecodeError:
            bad.append(key)
            continue
        validator.validate(ev)
        assert ev["request_id"] == key
    assert bad == ["demo-broken"], "exactly one deliberately malformed record, for the DLQ"
    assert len(lines) > 10
