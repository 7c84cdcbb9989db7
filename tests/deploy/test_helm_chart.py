"""The Helm chart, rendered and linted offline with the Helm v4 library (helm-python-sdk) and every
manifest validated with kubernetes-validate --strict; CRDs (ServiceMonitor, ScaledObject,
PyTorchJob) are checked against the schemas of the fields the chart sets, carried here."""

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from server.api.config import ServerConfig  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "s1serve"
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "s1serve-dashboard.json"
KUBE_VERSION = "1.33.0"

VALUE_SETS = {
    "default": {},
    "one_gpu": {"engine": {"tensor_parallel_size": 1, "kv_cache_gib": 8}},
    "four_gpus_inference_pool": {"engine": {"tensor_parallel_size": 4, "kv_cache_gib": 50}, "inferencePool": {"enabled": True}},
    "keda": {"autoscaling": {"mode": "keda"}},
    "hpa": {"autoscaling": {"mode": "hpa"}},
    "service_monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "training_job": {"training": {"enabled": True}},
    "host_path_ingress_key": {"model": {"source": "hostPath", "hostPath": "/mnt/weights"}, "ingress": {"enabled": True, "tlsSecret": "tls"},
                              "apiKey": {"existingSecret": "s1serve-key"}},
}

# The fields the chart sets on custom resources, with their types (from the operators' CRDs).
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"], "properties": {
            "jobLabel": {"type": "string"},
            "selector": {"type": "object", "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": False, "properties": {
                "port": {"type": "string"}, "path": {"type": "string"}, "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}}},
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"], "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"], "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"}}},
            "minReplicaCount": {"type": "integer", "minimum": 0}, "maxReplicaCount": {"type": "integer", "minimum": 1},
            "triggers": {"type": "array", "items": {"type": "object", "required": ["type", "metadata"], "properties": {
                "type": {"const": "prometheus"},
                "metadata": {"type": "object", "required": ["serverAddress", "query", "threshold"], "additionalProperties": {"type": "string"}}}}}}}},
    },
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "additionalProperties": False, "required": ["selector", "targetPorts", "endpointPickerRef"],
                                "properties": {
            "selector": {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
                         "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": {"type": "object", "additionalProperties": False,
                            "required": ["number"], "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}}},
            "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
            "endpointPickerRef": {"type": "object", "additionalProperties": False, "required": ["name", "port"], "properties": {
                "group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string", "minLength": 1},
                "port": {"type": "object", "required": ["number"], "properties": {"number": {"type": "integer"}}},
                "failureMode": {"enum": ["FailOpen", "FailClose"]}}}}}},
    },
    ("kubeflow.org/v1", "PyTorchJob"): {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "additionalProperties": False, "required": ["pytorchReplicaSpecs"], "properties": {
            "runPolicy": {"type": "object"},
            "pytorchReplicaSpecs": {"type": "object", "additionalProperties": False, "required": ["Master"], "properties": {
                role: {"type": "object", "required": ["replicas", "template"], "properties": {
                    "replicas": {"type": "integer", "minimum": 1}, "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                    "template": {"type": "object"}}} for role in ("Master", "Worker")}}}}},
    },
}


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART))


def render(chart, values: dict) -> list[dict]:
    chart.validate_schema(chart.merge_values(values))
    manifests = chart.render(values, name="s1", namespace="serving", is_install=True)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def server_flags(args: list[str]) -> dict[str, str | bool]:
    flags, i = {}, 1
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[args[i]] = args[i + 1]
            i += 2
        else:
            flags[args[i]] = True
            i += 1
    return flags


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_manifest_validates_strictly(chart, name):
    docs = render(chart, VALUE_SETS[name])
    assert by_kind(docs, "Deployment") and by_kind(docs, "Service")
    for doc in docs:
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd:
            jsonschema.validate(doc, crd)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_chart_lints_strictly_with_every_value_set():
    for values in VALUE_SETS.values():
        report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
        assert not report["errors"], report
        assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_ports_probes_gpus_and_flags_agree(chart, name):
    values = chart.merge_values(VALUE_SETS[name])
    docs = render(chart, VALUE_SETS[name])
    [deployment] = by_kind(docs, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    flags = server_flags(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["args"][0] == "serve"
    assert ports == {"grpc": int(flags["--grpc-port"]), "http": int(flags["--http-port"])}
    assert (ports["grpc"], ports["http"]) == (ServerConfig.grpc_port, ServerConfig.http_port)  # the server's own defaults
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        port = spec["grpc"]["port"] if "grpc" in spec else spec["httpGet"]["port"]
        assert port in ports.values()
        if "httpGet" in spec:
            assert spec["httpGet"]["path"] == "/health" and port == ports["http"]
    resources = container["resources"]
    # One GPU per tensor-parallel rank.
    ranks = values["engine"]["tensor_parallel_size"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == ranks
    # Engine values map 1:1 onto EngineConfig flags the CLI accepts.
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for key, value in values["engine"].items():
        assert key in engine_fields
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            assert flags.get(flag if value else "--no-" + key.replace("_", "-")) is True
        else:
            assert flags[flag] == str(value)
    [service] = by_kind(docs, "Service")
    service_ports = {p["name"]: (p["targetPort"], p["appProtocol"]) for p in service["spec"]["ports"]}
    assert service_ports == {"grpc": ("grpc", "kubernetes.io/h2c"), "http": ("http", "http")}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    if values["model"]["source"] == "pvc":
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == values["model"]["pvcName"]
    else:
        assert volumes["model"]["hostPath"]["path"] == values["model"]["hostPath"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_service_monitor_scrapes_the_port_that_serves_metrics(chart):
    docs = render(chart, VALUE_SETS["service_monitor"])
    [monitor] = by_kind(docs, "ServiceMonitor")
    [service] = by_kind(docs, "Service")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    http = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    assert http["port"] == ServerConfig.http_port  # the HTTP server answers /metrics
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_keda_scales_on_the_waiting_requests_gauge(chart):
    [scaled] = by_kind(render(chart, VALUE_SETS["keda"]), "ScaledObject")
    assert "vllm:num_requests_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    [deployment] = by_kind(render(chart, VALUE_SETS["keda"]), "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def test_training_job_runs_the_trainer_on_two_nodes_of_eight(chart):
    [job] = by_kind(render(chart, VALUE_SETS["training_job"]), "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] + specs["Worker"]["replicas"] == 2
    container = specs["Master"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    command = container["args"][0]
    assert "--num_processes 16" in command and "-m trainer" in command and "fsdp_2x8.yaml" in command
    assert not by_kind(render(chart, {}), "PyTorchJob")  # off by default


def test_dashboard_configmap_holds_the_grafana_dashboard(chart):
    [configmap] = by_kind(render(chart, {}), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["s1serve-dashboard.json"]) == json.loads(DASHBOARD.read_text())


def test_api_key_comes_from_a_secret_and_is_never_rendered(chart):
    docs = render(chart, VALUE_SETS["host_path_ingress_key"])
    assert not by_kind(docs, "Secret")
    [deployment] = by_kind(docs, "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["S1SERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s1serve-key", "key": "api-key"}
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--api-key" not in args
    default = by_kind(render(chart, {}), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert "S1SERVE_API_KEY" not in {e["name"] for e in default["env"]} and not by_kind(render(chart, {}), "Secret")


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": -1}, "/replicaCount"),
    ({"engine": {"tensor_parallel_size": 0}}, "/engine/tensor_parallel_size"),
    ({"inferencePool": {"endpointPicker": {"name": "epp", "port": 70000}}}, "/inferencePool/endpointPicker/port"),
    ({"model": {"source": "s3"}}, "/model/source"),
    ({"engine": {"max_num_seqs": 0}}, "/engine/max_num_seqs"),
    ({"engine": {"unknown_flag": 1}}, "unknown_flag"),
    ({"apiKey": {"value": "hunter2"}}, "/apiKey"),
])
def test_bad_values_are_rejected_by_the_schema(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(chart.merge_values(values))


def test_an_inference_pool_selects_exactly_the_server_pods_on_the_rest_port(chart):
    docs = render(chart, {"inferencePool": {"enabled": True, "endpointPicker": {"name": "epp", "port": 9002}}})
    [pool] = by_kind(docs, "InferencePool")
    [deployment] = by_kind(docs, "Deployment")
    assert pool["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    http = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert pool["spec"]["targetPorts"] == [{"number": http}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "epp", "port": {"number": 9002}, "failureMode": "FailOpen"}
    assert not by_kind(render(chart, {}), "InferencePool")


def test_the_default_kv_pool_fits_beside_s1_32b_on_two_h100s(chart):
    """The values' memory arithmetic (deploy/README.md): Qwen2.5-32B in bf16 on 2 ranks of 80 GB."""
    values = chart.merge_values({})
    engine = values["engine"]
    layers, kv_heads, head_dim, vocab, hidden = 64, 8, 128, 152064, 5120
    params = 32.76e9
    replicated = 2 * vocab * hidden * 2  # embedding and LM head, bf16, on every rank
    per_rank = (params * 2 - replicated) / engine["tensor_parallel_size"] + replicated
    h100 = 80e9
    headroom = 5 * 2**30  # activations, CUDA context, NCCL buffers
    assert per_rank + engine["kv_cache_gib"] * 2**30 + headroom <= h100
    per_token = layers * (kv_heads // engine["tensor_parallel_size"]) * head_dim * 2 * 2
    assert engine["kv_cache_gib"] * 2**30 // per_token >= 8 * 32768  # eight 32k-token thinking sequences at once
