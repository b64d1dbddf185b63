"""Issue 15: the Kubernetes manifests under deploy/k8s validate offline (kubernetes-validate, strict,
against the pinned Kubernetes schema) and describe the deployment the README promises: N GPU
nodes, a Qdrant cluster in distributed mode, the controller, the orchestrator on a persistent
volume, the trainer without a GPU (its image has CPU torch), /health probes and resources everywhere, Prometheus scraping, the
API token from a Secret, and only settings the services actually read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.37.0"  # the newest schema kubernetes-validate==1.37.0 ships
SERVICES = {"node": 8001, "controller": 8002, "orchestrator": 8000, "trainer": 8003}


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = []
    for res in kust["resources"]:
        out += load(K8S / res)
    return out


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs) -> dict[str, dict]:
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}


def container(w: dict) -> dict:
    (c,) = w["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def test_every_manifest_validates_strictly_against_the_kubernetes_schema(docs):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    assert docs
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises on any unknown or wrong field
    # the operator's CRD is not in the core schema: checked for shape here
    (sm,) = load(K8S / "monitoring" / "servicemonitor.yaml")
    assert sm["kind"] == "ServiceMonitor" and sm["apiVersion"] == "monitoring.coreos.com/v1"
    ep = sm["spec"]["endpoints"][0]
    assert ep["path"] == "/metrics" and ep["authorization"]["credentials"]["name"] == "negspace-api-token"
    assert set(sm["spec"]["selector"]["matchExpressions"][0]["values"]) >= set(SERVICES)


def test_kustomization_lists_every_manifest_and_not_the_secret_placeholder():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kust["resources"]) == on_disk
    (secret,) = load(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "negspace-api-token"


def test_every_service_has_probes_on_health_resources_and_scrape_annotations(docs):
    w = workloads(docs)
    assert set(SERVICES) | {"qdrant"} == set(w)
    for name, wl in w.items():
        c = container(wl)
        ann = wl["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics", name
        for probe in ("readinessProbe", "livenessProbe"):
            path = c[probe]["httpGet"]["path"]
            assert path == ("/health" if name != "qdrant" else {"readinessProbe": "/readyz",
                                                                "livenessProbe": "/livez"}[probe]), name
        res = c["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], name
        if name in SERVICES:
            assert c["ports"][0]["containerPort"] == SERVICES[name] == int(ann["prometheus.io/port"])
            assert env_of(c)[f"{name.upper()}_PORT"]["value"] == str(SERVICES[name])
            assert env_of(c)[f"{name.upper()}_HOST"]["value"] == "0.0.0.0"


def test_gpu_nodes_scale_as_replicas_and_only_the_nodes_request_a_gpu(docs):
    w = workloads(docs)
    node = w["node"]
    assert node["kind"] == "Deployment" and node["spec"]["replicas"] >= 2
    c = container(node)
    res = c["resources"]
    # one device per pod from the device plugin; tensor parallel over T GPUs asks for T
    gpus = env_of(c)["NODE_TENSOR_PARALLEL_SIZE"]["value"]
    assert res["limits"]["nvidia.com/gpu"] == gpus == res["requests"]["nvidia.com/gpu"]
    assert c["image"] == "negspace-node:gpu"
    # vLLM's processes (and tensor-parallel workers) talk through /dev/shm: RAM-backed, not 64 MiB
    shm = {v["name"]: v for v in node["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory"
    # the trainer image installs CPU torch (services/trainer/Dockerfile): a GPU would sit idle
    trainer_dockerfile = (ROOT / "services" / "trainer" / "Dockerfile").read_text()
    assert "ARG TORCH_SPEC=torch==2.13.0+cpu" in trainer_dockerfile
    for name in ("trainer", "controller", "orchestrator", "qdrant"):
        res = container(w[name])["resources"]
        assert "nvidia.com/gpu" not in {**res.get("limits", {}), **res.get("requests", {})}, name
        assert not w[name]["spec"]["template"]["spec"].get("tolerations"), name


def test_qdrant_runs_as_a_distributed_cluster(docs):
    q = workloads(docs)["qdrant"]
    assert q["kind"] == "StatefulSet" and q["spec"]["replicas"] >= 3
    env = env_of(container(q))
    assert env["QDRANT__CLUSTER__ENABLED"]["value"] == "true"
    assert env["QDRANT__SERVICE__API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "negspace-api-token"
    headless = by_kind(docs, "Service")[q["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in headless["spec"]["ports"]} == {6333, 6334, 6335}
    script = container(q)["args"][0]
    assert "--bootstrap" in script and "qdrant-0.qdrant-headless:6335" in script
    assert q["spec"]["volumeClaimTemplates"]


def test_state_lives_on_persistent_volumes(docs):
    w = workloads(docs)
    orch = w["orchestrator"]
    assert orch["kind"] == "StatefulSet" and orch["spec"]["replicas"] == 1  # SQLite: one writer
    mount = {m["name"]: m["mountPath"] for m in container(orch)["volumeMounts"]}
    assert orch["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in mount
    env = env_of(container(orch))
    assert env["ORCHESTRATOR_DB"]["value"].startswith(mount["runs"])
    ctl = w["controller"]
    assert env_of(container(ctl))["CONTROLLER_INDEX_SNAPSHOTS"]["value"].startswith("/data")
    assert ctl["spec"]["volumeClaimTemplates"]
    tr = w["trainer"]
    assert tr["spec"]["strategy"]["type"] == "Recreate"
    claim = tr["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(docs, "PersistentVolumeClaim")


def test_the_token_comes_from_the_secret_everywhere(docs):
    for name, wl in workloads(docs).items():
        env = env_of(container(wl))
        for var in ("NEGSPACE_API_TOKEN", "CONTROLLER_QDRANT_API_KEY", "QDRANT__SERVICE__API_KEY"):
            if var in env:
                assert "value" not in env[var], f"{name}: {var} must not be a literal"
                assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "negspace-api-token", "key": "token"}
        if name in SERVICES:
            assert "NEGSPACE_API_TOKEN" in env, name


def pod_names(docs) -> dict[str, str]:
    """``<statefulset>-<i>.<its headless service>`` (the stable DNS name of each replica, which
    exists only when the governing service is headless) -> that service."""
    services = by_kind(docs, "Service")
    out = {}
    for name, sts in by_kind(docs, "StatefulSet").items():
        svc = sts["spec"]["serviceName"]
        if services.get(svc, {}).get("spec", {}).get("clusterIP") == "None":
            out.update({f"{name}-{i}.{svc}": svc for i in range(sts["spec"]["replicas"])})
    return out


def test_services_select_their_pods_and_urls_name_existing_services(docs):
    services = by_kind(docs, "Service")
    labels = {n: wl["spec"]["template"]["metadata"]["labels"] for n, wl in workloads(docs).items()}
    for name, svc in services.items():
        sel = svc["spec"]["selector"]
        assert any(all(lab.get(k) == v for k, v in sel.items()) for lab in labels.values()), name
    ports = {n: {p["port"] for p in s["spec"]["ports"]} for n, s in services.items()}
    pods = pod_names(docs)
    for name, wl in workloads(docs).items():
        for var, e in env_of(container(wl)).items():
            value = e.get("value", "")
            if var.endswith(("_URL", "_URLS")) and value.startswith("http://"):
                value = value.replace("$(CONTROLLER_POD_NAME)", f"{name}-0")  # a pod's own name
                for url in value.split(","):  # list settings take comma-separated URLs
                    host, port = url.strip()[len("http://"):].split("/")[0].split(":")
                    svc = host if host in services else pods.get(host)
                    assert svc is not None and int(port) in ports[svc], f"{name}: {var}={value}"


def test_the_orchestrator_lists_each_controller_replica_once_by_its_own_name(docs):
    """Runs are routed among the listed URLs and stay on theirs, so each URL must reach exactly one
    replica: a pod's own name, never the load-balanced ``controller`` Service; and every replica
    must be listed (an unlisted one would get no runs)."""
    from negspace_orchestrator.settings import OrchestratorSettings

    ctl = workloads(docs)["controller"]
    assert ctl["kind"] == "StatefulSet" and ctl["spec"]["replicas"] >= 2
    headless = by_kind(docs, "Service")[ctl["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert "app.kubernetes.io/name" not in headless["metadata"].get("labels", {})  # scraped once, via `controller`
    value = env_of(container(workloads(docs)["orchestrator"]))["ORCHESTRATOR_CONTROLLER_URL"]["value"]
    urls = OrchestratorSettings(controller_url=value).controller_url
    assert urls == [f"http://controller-{i}.{headless['metadata']['name']}:8002"
                    for i in range(ctl["spec"]["replicas"])]


def test_every_env_var_is_a_setting_of_its_service(docs):
    """A misspelt variable would be ignored silently (the settings classes use extra='ignore')."""
    from negspace_controller.settings import ControllerSettings
    from negspace_node.settings import NodeSettings
    from negspace_orchestrator.settings import OrchestratorSettings
    from negspace_trainer.settings import TrainerSettings

    classes = {"node": NodeSettings, "controller": ControllerSettings, "orchestrator": OrchestratorSettings,
               "trainer": TrainerSettings}
    shared = {"NEGSPACE_API_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN"}
    for name, wl in workloads(docs).items():
        if name not in classes:
            continue
        prefix = classes[name].model_config["env_prefix"]
        env = env_of(container(wl))
        for var in env:
            if var in shared:
                continue
            if any(f"$({var})" in e.get("value", "") for e in env.values()):
                continue  # only expanded by Kubernetes into another variable (a pod's own name)
            assert var.startswith(prefix), f"{name}: {var} is not a {prefix}* setting"
            assert var[len(prefix):].lower() in classes[name].model_fields, f"{name}: {var} is not a setting"


def test_each_controller_replica_knows_itself_among_the_orchestrators_list(docs):
    """A controller replica loads and serves only the runs the orchestrator routes to it: its own
    URL (its pod's name) and the replica list must be exactly what the orchestrator routes over."""
    from negspace_controller.settings import ControllerSettings
    from negspace_orchestrator.settings import OrchestratorSettings

    ctl = workloads(docs)["controller"]
    env = env_of(container(ctl))
    orch = env_of(container(workloads(docs)["orchestrator"]))["ORCHESTRATOR_CONTROLLER_URL"]["value"]
    urls = OrchestratorSettings(controller_url=orch).controller_url
    assert env["CONTROLLER_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for i in range(ctl["spec"]["replicas"]):
        me = env["CONTROLLER_REPLICA_URL"]["value"].replace("$(CONTROLLER_POD_NAME)", f"controller-{i}")
        s = ControllerSettings(qdrant_url="http://qdrant:6333", replica_url=me,
                               replica_urls=env["CONTROLLER_REPLICA_URLS"]["value"])
        assert s.replica_urls == urls and s.replica_url == urls[i]


def test_qdrant_collections_survive_one_lost_peer(docs):
    """3 peers, 2 copies of every shard, a write confirmed by one: any one peer can go."""
    from negspace_controller.settings import ControllerSettings

    peers = workloads(docs)["qdrant"]["spec"]["replicas"]
    env = env_of(container(workloads(docs)["controller"]))
    s = ControllerSettings(qdrant_url="http://qdrant:6333",
                           qdrant_replication_factor=env["CONTROLLER_QDRANT_REPLICATION_FACTOR"]["value"],
                           qdrant_write_consistency_factor=env["CONTROLLER_QDRANT_WRITE_CONSISTENCY_FACTOR"]["value"])
    copies, confirm = s.qdrant_replication_factor, s.qdrant_write_consistency_factor
    assert peers >= 3 and 2 <= copies <= peers
    assert copies - confirm >= 1  # with a copy lost, every write is still confirmed
