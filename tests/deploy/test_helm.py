"""The Helm chart (helm/reranker) through Helm v4's own engine (helm-python-sdk binds Helm's Go
SDK: lint, values.schema.json, render, offline), with the rendered objects checked against the
code: the ConfigMap's TOML is loaded by the real binary, probes and ports follow http.listen, the
grace period outlasts the drain, autoscaling never exceeds the partitions.

kubectl is not used: `kubectl create --dry-run=client` needs an API server even with
--validate=false (it asks discovery to map kinds to resources), and none exists here. Instead every
built-in object is validated offline against the Kubernetes OpenAPI-derived JSON schemas shipped by
kubernetes-validate, strictly (unknown fields fail); the CRD objects (KEDA ScaledObject,
ServiceMonitor) are checked field by field below."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from deploylib import CHART, ROOT, drain_ms, http_routes, listen_port, reranker_config

KUBE_VERSION = "1.33.0"
helm.disable_logging()  # the dashboard symlink is reported at INFO on every load

GPU = helm.values_from_yaml((CHART / "values-gpu.yaml").read_text())
KEDA = {"autoscaling": {"enabled": True}}
HPA = {"autoscaling": {"enabled": True, "keda": {"enabled": False}}}
SASL = {"kafka": {"saslPasswordSecret": {"name": "kafka-credentials", "key": "password"}},
        "config": {"kafka": {"client": {"security.protocol": "SASL_SSL",
                                        "sasl.mechanism": "SCRAM-SHA-512",
                                        "sasl.username": "reranker"}}}}
PROFILES = {"default": {}, "gpu": GPU, "keda": KEDA, "hpa": HPA, "sasl": SASL,
            "gpu+keda": {**GPU, **KEDA}}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values=None) -> dict[str, list[dict]]:
    """kind -> objects rendered for `values` (NOTES.txt left out)."""
    out: dict[str, list[dict]] = {}
    for name, text in chart.render(values=values, name="rr", namespace="ml", is_install=True).items():
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.setdefault(doc["kind"], []).append(doc)
    return out


def one(objs, kind) -> dict:
    (o,) = objs[kind]
    return o


def effective(objs, tmp_path: Path) -> dict:
    """The configuration a pod would run with: the ConfigMap's file plus the container's RERANKER_*
    env (secret values stand in as dummies), loaded by the real binary."""
    toml_text = one(objs, "ConfigMap")["data"]["reranker.toml"]
    f = tmp_path / "reranker.toml"
    f.write_text(toml_text)
    container = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "dummy-secret") for e in container.get("env", [])}
    assert all(k.startswith("RERANKER_") for k in env), env
    return reranker_config(f, env)


@pytest.mark.parametrize("profile", ["default", "gpu"])
def test_lint(profile):
    report = helm.lint(CHART, PROFILES[profile] or None, strict=True, kube_version="v" + KUBE_VERSION)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, report


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_config_is_accepted_by_the_binary(chart, profile, tmp_path):
    objs = render(chart, PROFILES[profile])
    cfg = effective(objs, tmp_path)
    values = chart.merge_values(PROFILES[profile])
    assert cfg["kafka"]["input_topic"] == values["config"]["kafka"]["input_topic"]
    assert cfg["model"]["device"] == values["config"]["model"]["device"]


@pytest.mark.parametrize("profile", PROFILES)
def test_ports_probes_and_grace_period_follow_the_config(chart, profile, tmp_path):
    objs = render(chart, PROFILES[profile])
    cfg = effective(objs, tmp_path)
    port = listen_port(cfg)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (p,) = c["ports"]
    assert p["containerPort"] == port and p["name"] == "metrics"
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for g in probes.values():
        assert g["port"] in ("metrics", port) and g["path"] in http_routes()
    svc = one(objs, "Service")
    assert svc["spec"]["ports"][0]["port"] == port and svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert pod["terminationGracePeriodSeconds"] * 1000 > drain_ms(cfg)
    assert c["args"] == ["run", "--config", "/etc/reranker/reranker.toml"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/reranker"


def test_listen_port_change_moves_everything(chart, tmp_path):
    objs = render(chart, {"config": {"http": {"listen": "0.0.0.0:9100"}}})
    assert listen_port(effective(objs, tmp_path)) == 9100
    c = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["ports"][0]["containerPort"] == 9100
    assert one(objs, "Service")["spec"]["ports"][0]["port"] == 9100


def test_grace_period_tracks_drain_timeout(chart, tmp_path):
    objs = render(chart, {"config": {"shutdown": {"drain_timeout_ms": 61500}}})
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 62 + 15
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render(chart, {"terminationGracePeriodSeconds": 20})  # == the 20 s default drain


def test_checksum_annotation_rolls_on_config_change(chart):
    def checksum_and_toml(values):
        objs = render(chart, values)
        ann = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return ann, one(objs, "ConfigMap")["data"]["reranker.toml"]
    a, toml_a = checksum_and_toml(None)
    # The annotation is the hash of the rendered file (the block scalar adds the final newline).
    assert a in (hashlib.sha256(toml_a.encode()).hexdigest(),
                 hashlib.sha256(toml_a.rstrip("\n").encode()).hexdigest())
    b, _ = checksum_and_toml({"config": {"batch": {"max_wait_ms": 5}}})
    assert a != b


def test_default_render_objects(chart):
    objs = render(chart)
    assert set(objs) == {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_security_context(chart):
    pod = one(render(chart), "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The image's USER (docker/Dockerfile) is the uid the pod runs as.
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    uid = next(l.split()[1].split(":")[0] for l in dockerfile.splitlines() if l.startswith("USER "))
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_gpu_profile(chart, tmp_path):
    objs = render(chart, GPU)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith("-cuda")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert effective(objs, tmp_path)["model"]["device"] == "cuda"
    # CPU default: none of it.
    cpu = one(render(chart), "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"].get("limits", {})
    assert "nodeSelector" not in cpu and "tolerations" not in cpu


@pytest.mark.parametrize("values, message", [
    ({"gpu": {"enabled": True}}, "config.model.device=cpu"),
    ({"config": {"model": {"device": "cuda"}}}, "needs gpu.enabled"),
    ({"config": {"kafka": {"client": {"sasl.password": "hunter2"}}}}, "saslPasswordSecret"),
    ({"config": {"http": {"enabled": False}}}, "probes"),
    ({"replicaCount": 5}, "kafka.partitions"),
])
def test_render_refuses_broken_values(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


def test_keda_scaled_object(chart, tmp_path):
    objs = render(chart, KEDA)
    cfg = effective(objs, tmp_path)
    so = one(objs, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    dep = one(objs, "Deployment")
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert "replicas" not in dep["spec"], "the autoscaler owns the replica count"
    (t,) = so["spec"]["triggers"]
    assert t["type"] == "kafka"
    md = t["metadata"]
    assert md["bootstrapServers"] == cfg["kafka"]["brokers"]
    assert md["consumerGroup"] == cfg["kafka"]["group_id"]
    assert md["topic"] == cfg["kafka"]["input_topic"]
    assert int(md["lagThreshold"]) > 0
    assert md["allowIdleConsumers"] == "false" and md["offsetResetPolicy"] == "earliest"
    assert all(isinstance(v, str) for v in md.values()), "KEDA trigger metadata is string-valued"
    values = chart.merge_values(KEDA)
    assert so["spec"]["maxReplicaCount"] <= values["kafka"]["partitions"]
    assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    assert "HorizontalPodAutoscaler" not in objs


def test_hpa_fallback_without_keda(chart):
    objs = render(chart, HPA)
    assert "ScaledObject" not in objs
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": one(objs, "Deployment")["metadata"]["name"]}
    assert hpa["spec"]["maxReplicas"] <= chart.merge_values(HPA)["kafka"]["partitions"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize("mode", [KEDA, HPA])
def test_max_replicas_above_partitions_fails_unless_allowed(chart, mode):
    over = copy.deepcopy(mode)
    over["autoscaling"]["maxReplicas"] = 5  # partitions: 4
    with pytest.raises(helm.HelmRenderError, match=r"maxReplicas \(5\) exceeds kafka.partitions \(4\)"):
        render(chart, over)
    over["kafka"] = {"allowReplicasAbovePartitions": True}
    objs = render(chart, over)
    kind = "ScaledObject" if "ScaledObject" in objs else "HorizontalPodAutoscaler"
    spec = one(objs, kind)["spec"]
    assert spec.get("maxReplicaCount", spec.get("maxReplicas")) == 5


def test_sasl_password_comes_from_the_secret(chart, tmp_path):
    objs = render(chart, SASL)
    c = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    (env,) = c["env"]
    assert env == {"name": "RERANKER_KAFKA__CLIENT__SASL_PASSWORD",
                   "valueFrom": {"secretKeyRef": {"name": "kafka-credentials", "key": "password"}}}
    assert "sasl.password" not in one(objs, "ConfigMap")["data"]["reranker.toml"]
    client = effective(objs, tmp_path)["kafka"]["client"]
    assert client["sasl.password"] == "<redacted>"  # the env var reached librdkafka's key
    assert client["sasl.mechanism"] == "SCRAM-SHA-512"


def test_service_monitor_and_dashboard_are_opt_in(chart):
    objs = render(chart, {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}})
    (ep,) = one(objs, "ServiceMonitor")["spec"]["endpoints"]
    assert ep["port"] == one(objs, "Service")["spec"]["ports"][0]["name"]
    assert ep["path"] == "/metrics" and ep["path"] in http_routes()
    dash = next(o for o in objs["ConfigMap"] if o["metadata"]["name"].endswith("-dashboard"))
    assert json.loads(dash["data"]["reranker.json"]) == json.loads(
        (ROOT / "helm" / "dashboards" / "reranker.json").read_text())
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.parametrize("bad, where", [
    ({"kafka": {"partitions": 0}}, "/kafka/partitions"),
    ({"config": {"model": {"device": "tpu"}}}, "/config/model/device"),
    ({"config": {"modle": {"dir": "/m"}}}, "additional properties 'modle'"),
    ({"config": {"batch": {"max_wait": 5}}}, "additional properties 'max_wait'"),
    ({"autoscaling": {"maxReplicas": "three"}}, "/autoscaling/maxReplicas"),
    ({"config": {"flow": {"resume_ratio": 1.5}}}, "/config/flow/resume_ratio"),
])
def test_schema_rejects_bad_values(chart, bad, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmValuesError):
        render(chart, bad)


def test_schema_config_keys_are_the_binary_keys(chart):
    """values.schema.json's config section names exactly the keys `reranker config` knows."""
    cfg = reranker_config()
    schema = chart.schema["properties"]["config"]["properties"]
    assert set(schema) == set(cfg), set(schema) ^ set(cfg)
    for section, keys in cfg.items():
        # Option keys, unset by default
        unset = {
            "model": {"name"},
            "processing": {"transactional_id"},
            "kafka": {"stall_warn_ms"},
            "input": {"text_template"},
            "output": {"min_relevance"},
        }
        expected = set(keys) | unset.get(section, set())
        assert set(schema[section]["properties"]) == expected, section


@pytest.mark.parametrize("profile", PROFILES)
def test_builtin_objects_match_kubernetes_schemas(chart, profile):
    objs = render(chart, {**PROFILES[profile], "serviceMonitor": {"enabled": True}})
    checked = 0
    for kind, docs in objs.items():
        for doc in docs:
            if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
                continue  # CRDs: checked field by field above
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            checked += 1
    assert checked >= 5
