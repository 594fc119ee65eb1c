"""The cluster kit (``launch/cluster/``), each file checked by its own tool's validator:

* ``ray-cluster.yaml``: Ray's own preparation and validation of a launcher config, the path
  ``ray up`` takes (``prepare_config``, the ``local`` provider's checks, ``validate_config``
  against Ray's ``ray-schema.json``); every ``ray start`` line parsed by Ray's CLI; every
  command through shellcheck.
* ``kuberay.yaml``: **schema-validated**: the Service and every pod template of the RayCluster
  (wrapped as a ``PodTemplate``) against the Kubernetes JSON schemas of kubernetes-validate, in
  strict mode (unknown fields rejected). **Structure-checked**: no package on the registries ships
  KubeRay's CRD schema, so the RayCluster's own fields are checked with jsonschema against
  ``RAYCLUSTER_V1`` below, written here from the field structure of KubeRay's ``ray.io/v1``
  RayCluster CRD (names, types, required fields; only the fields this kit may use). The
  containers' scripts go through shellcheck.
* ``Dockerfile``: hadolint (the linter's own binary) finds nothing; dockerfile-parse gives the
  instructions for the project's rules: a CUDA base, torch's CUDA build pinned to the project's
  torch pin, the GPU requirements, no weights, a non-root user; its health probe is run against a
  real gRPC health server.
* ``RUNBOOK.md``: every fenced ``bash`` block through ``bash -n`` and shellcheck; every ``relay``
  command line (also inside ``ray exec``) parsed by Relay's own parser, every ``relay plan`` one
  run; every ``ray`` command line parsed by Ray's CLI.

Each validator is also shown a corrupted copy, which it must reject.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "launch" / "cluster"
RAY_YAML = KIT / "ray-cluster.yaml"
KUBERAY_YAML = KIT / "kuberay.yaml"
DOCKERFILE = KIT / "Dockerfile"
RUNBOOK = KIT / "RUNBOOK.md"

IMAGE = "relay:cluster"  # the tag the runbook builds and both cluster files run
GPUS_PER_NODE = 8  # the kit is written for 8 x A6000 machines
RELAY_UID = 1000
MODEL_DIR = "/models/Wan2.2-T2V-A14B-Diffusers"
# Kubernetes versions the manifest must validate against: gRPC probes are GA from 1.27.
KUBERNETES_VERSIONS = ("1.27", "latest")
# The runbook's programs (a typo in a command's name fails).
PROGRAMS = {"relay", "ray", "docker", "ssh", "rsync", "kubectl", "helm", "openssl", "curl", "source"}


def _tool(name: str) -> str:
    """A validator binary of the dev requirements, from this environment (else PATH)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: pip install -r requirements/dev.txt")
    return found


def _shellcheck(script: str, exclude: tuple[str, ...] = ()) -> list[dict]:
    """shellcheck's findings (every severity) for a bash script, less the codes excluded."""
    flags = [f"--exclude={','.join(exclude)}"] if exclude else []
    out = subprocess.run([_tool("shellcheck"), "--shell=bash", "--format=json", *flags, "-"], input=script,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout or "[]")


def _assert_shellcheck_clean(script: str, where: str, exclude: tuple[str, ...] = ()) -> None:
    findings = _shellcheck(script, exclude)
    assert not findings, f"{where}: " + "; ".join(f"SC{f['code']} line {f['line']}: {f['message']}"
                                                   for f in findings)


def _relay_args(argv: list[str]):
    """``relay ARGV`` parsed by Relay's own argument parser (AssertionError naming the line)."""
    from relay.cli.main import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"relay {shlex.join(argv)}: rejected by relay's parser") from exc


def _ray_command(argv: list[str]):
    """``ray ARGV`` parsed by Ray's click CLI (the sub-command's options, not run)."""
    import click
    from ray.scripts.scripts import cli

    name, *rest = argv
    assert name in cli.commands, f"ray {name}: no such command"
    try:
        return cli.commands[name].make_context(name, list(rest))
    except click.ClickException as exc:
        raise AssertionError(f"ray {shlex.join(argv)}: {exc.format_message()}") from exc


# --------------------------------------------------------------------------- the Ray launcher


def _ray_config() -> dict:
    return yaml.safe_load(RAY_YAML.read_text())


def _bootstrap(config: dict) -> dict:
    """What ``ray up`` does to a config before it touches a node: Ray's own preparation,
    provider checks and schema validation (no network, no SSH, no config cache)."""
    from ray.autoscaler._private.commands import _bootstrap_config

    return _bootstrap_config(copy.deepcopy(config), no_config_cache=True)


def _ray_commands(config: dict) -> list[str]:
    return [cmd for key in ("initialization_commands", "setup_commands", "head_start_ray_commands",
                            "worker_start_ray_commands") for cmd in config.get(key, [])]


def test_ray_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _ray_config()
    prepared = _bootstrap(config)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert prepared["provider"]["type"] == "local"
    assert prepared["docker"]["image"] == IMAGE
    assert "--gpus all" in prepared["docker"]["run_options"]
    assert "-v /models:/models" in prepared["docker"]["run_options"]
    # one head and N-1 workers, all kept: the local provider's single node type spans them
    assert prepared["max_workers"] == len(config["provider"]["worker_ips"]) >= 1
    # the weights are fetched on every node, head and workers
    assert prepared["head_setup_commands"] == prepared["worker_setup_commands"] == config["setup_commands"]


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda c: c.update(head_node_typo={}), id="unknown top-level field"),
    pytest.param(lambda c: c["docker"].update(run_options="--gpus all"), id="run_options not a list"),
    pytest.param(lambda c: c["docker"].update(pull_before_runs=False), id="misspelt docker field"),
    pytest.param(lambda c: c["auth"].update(ssh_user=22), id="ssh_user not a string"),
    pytest.param(lambda c: c["provider"].pop("head_ip"), id="no head_ip"),
])
def test_ray_launcher_validation_rejects_a_corrupted_copy(corrupt):
    import click

    config = _ray_config()
    corrupt(config)
    with pytest.raises((jsonschema.ValidationError, click.ClickException, ValueError)):
        _bootstrap(config)


def _start_lines(command: str) -> list[list[str]]:
    """The ``ray start`` invocations of one start command, its shell substitutions replaced by
    what they give on a node (8 GPUs, the head's address)."""
    command = command.replace('"$(nvidia-smi --list-gpus | wc -l)"', str(GPUS_PER_NODE))
    command = command.replace("$RAY_HEAD_IP", "192.0.2.10")
    lines = [shlex.split(part) for part in re.split(r";|&&", command)]
    return [words for words in lines if words[:2] == ["ray", "start"]]


def test_ray_start_commands_parse_with_rays_cli_and_claim_every_gpu():
    config = _ray_config()
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        starts = [words for cmd in config[key] for words in _start_lines(cmd)]
        assert len(starts) == 1, key
        params = _ray_command(starts[0][1:]).params
        assert params["head"] is head, key
        assert params["num_gpus"] == GPUS_PER_NODE, key
        if not head:
            assert params["address"] == "192.0.2.10:6379"
    with pytest.raises(AssertionError, match="No such option"):
        _ray_command(["start", "--num-gpu=8"])


def test_ray_launcher_commands_pass_shellcheck():
    for command in _ray_commands(_ray_config()):
        _assert_shellcheck_clean(command, command[:60])
    assert _shellcheck('ray start --address=$RAY_HEAD_IP:6379 && cd $HOME'), "shellcheck must flag this"


def _fetch_script(command: str) -> tuple[str, list[str]]:
    """The inner script of the once-per-node fetch (``flock LOCK bash -c SCRIPT``) and the
    arguments of its ``hf download``."""
    words = shlex.split(command)
    assert words[0] == "flock" and words[2:4] == ["bash", "-c"], command
    script = words[4]
    match = re.search(r"hf download ([^;&|}]+)", script)
    assert match, script
    return script, shlex.split(match.group(1))


def _check_fetch(command: str) -> None:
    """One weight fetch: its shell is clean, it downloads into the served folder once (the
    marker), and every option it gives is one ``hf download`` has."""
    script, args = _fetch_script(command)
    _assert_shellcheck_clean(script, "weight fetch")
    repo, *options = args
    assert repo == "Wan-AI/" + Path(MODEL_DIR).name
    assert options == ["--local-dir", MODEL_DIR]
    assert f"test -f {MODEL_DIR}/.relay-complete" in script and f"touch {MODEL_DIR}/.relay-complete" in script
    help_text = _hf_download_help()
    for option in options[::2]:
        assert option in help_text, option


_HF_HELP: list[str] = []


def _hf_download_help() -> str:
    if not _HF_HELP:
        out = subprocess.run([_tool("hf"), "download", "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _HF_HELP.append(out.stdout)
    return _HF_HELP[0]


def test_ray_launcher_fetches_the_served_weights_once_per_node():
    config = _ray_config()
    (fetch,) = config["setup_commands"]
    _check_fetch(fetch)
    (init,) = config["initialization_commands"]
    assert f"chown {RELAY_UID}:{RELAY_UID} /models" in init


# --------------------------------------------------------------------------- KubeRay

# The RayCluster fields this kit may use, from the structure of KubeRay's ray.io/v1 RayCluster
# CRD (operator 1.7): names, types and required fields. The pod templates inside are validated
# against the Kubernetes schemas separately, so here they need only be objects.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"],
                 "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
                 "additionalProperties": False}
RAYCLUSTER_V1 = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "namespace": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP},
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {"type": "object"},
                "headServiceAnnotations": _STRING_MAP,
                "suspend": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["template"],
                    "additionalProperties": False,
                    "properties": {
                        "rayStartParams": _STRING_MAP,
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "enableIngress": {"type": "boolean"},
                        "template": _POD_TEMPLATE,
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "numOfHosts": {"type": "integer", "minimum": 1},
                            "idleTimeoutSeconds": {"type": "integer"},
                            "suspend": {"type": "boolean"},
                            "rayStartParams": _STRING_MAP,
                            "template": _POD_TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


def _kuberay_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(KUBERAY_YAML.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) and set(by_kind) == {"Service", "RayCluster"}
    return by_kind


def _pod_templates(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    out = {"head": spec["headGroupSpec"]["template"]}
    out.update({group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]})
    return out


def _as_pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "relay"}, "template": template}


def _kubernetes_validate(obj: dict) -> None:
    """kubernetes-validate in strict mode, for each Kubernetes version the kit supports."""
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        if version == "latest":
            version = kubernetes_validate.utils.latest_version()
        kubernetes_validate.validate(obj, version, strict=True)


def test_kuberay_kubernetes_objects_pass_the_kubernetes_schemas():
    docs = _kuberay_docs()
    _kubernetes_validate(docs["Service"])
    for name, template in _pod_templates(docs["RayCluster"]).items():
        try:
            _kubernetes_validate(_as_pod_template(template))
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"{name} pod template: {exc.message}") from exc


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda t: t["spec"]["containers"][0].update(resource={}), id="misspelt container field"),
    pytest.param(lambda t: t["spec"]["containers"][0]["ports"].append({"containerPort": "50051"}),
                 id="port as a string"),
    pytest.param(lambda t: t["spec"]["volumes"][0]["hostPath"].update(type=3), id="hostPath type not a string"),
    pytest.param(lambda t: t["spec"].pop("containers"), id="no containers"),
])
def test_kubernetes_schemas_reject_a_corrupted_pod_template(corrupt):
    import kubernetes_validate

    template = copy.deepcopy(_pod_templates(_kuberay_docs()["RayCluster"])["head"])
    corrupt(template)
    with pytest.raises(kubernetes_validate.ValidationError):
        _kubernetes_validate(_as_pod_template(template))


def test_kubernetes_schemas_reject_a_corrupted_service():
    import kubernetes_validate

    service = copy.deepcopy(_kuberay_docs()["Service"])
    service["spec"]["ports"][0]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        _kubernetes_validate(service)


def test_raycluster_has_kuberays_structure():
    jsonschema.validate(_kuberay_docs()["RayCluster"], RAYCLUSTER_V1)


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda s: s.update(headGroupSpecs=s.pop("headGroupSpec")), id="misspelt headGroupSpec"),
    pytest.param(lambda s: s["workerGroupSpecs"][0].pop("groupName"), id="worker group without a name"),
    pytest.param(lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}), id="non-string param"),
    pytest.param(lambda s: s["workerGroupSpecs"][0].update(replicas="2"), id="replicas as a string"),
])
def test_raycluster_structure_rejects_a_corrupted_copy(corrupt):
    cluster = copy.deepcopy(_kuberay_docs()["RayCluster"])
    corrupt(cluster["spec"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, RAYCLUSTER_V1)


def _container(template: dict, name: str) -> dict:
    (found,) = [c for c in template["spec"]["containers"] if c["name"] == name]
    return found


#: The ports ``ray start --head`` binds that KubeRay sets when ``rayStartParams`` leaves them out.
KUBERAY_HEAD_PORTS = {"port": 6379, "dashboard-port": 8265, "ray-client-server-port": 10001,
                      "metrics-export-port": 8080, "dashboard-agent-listen-port": 52365}


def _served_command(script: str) -> list[str]:
    """The ``relay serve`` line of a container script (continuations joined, ``&`` dropped)."""
    joined = script.replace("\\\n", " ")
    (line,) = [ln.strip() for ln in joined.splitlines() if ln.strip().startswith("relay serve")]
    return shlex.split(line.removesuffix("&"))[1:]


def test_kuberay_cluster_is_wired_to_relay_serve():
    import ray

    docs = _kuberay_docs()
    service, cluster = docs["Service"], docs["RayCluster"]
    spec, templates = cluster["spec"], _pod_templates(cluster)
    assert spec["rayVersion"] == ray.__version__ == _dockerfile_args()["RAY_VERSION"]
    # relay serve runs on the head, after KubeRay's own `ray start` (overwrite-container-cmd)
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = _container(templates["head"], "ray-head")
    args = _relay_args(_served_command(head["args"][0]))
    assert args.command == "serve"
    assert (args.executor, args.ray_address, args.device, args.host) == ("ray", "auto", "cuda", "0.0.0.0")
    # every GPU of the workers is in a group, the head holds none
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (workers,) = spec["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"]
    worker = _container(workers["template"], "ray-worker")
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(worker["resources"]["requests"]["nvidia.com/gpu"]) == GPUS_PER_NODE
    assert args.nproc * args.replicas == workers["replicas"] * gpus
    # the Service reaches relay serve's ports on the head pod (the labels KubeRay sets)
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": args.port, "http": args.http_port, "metrics": args.metrics_port}
    assert (ports["grpc"], ports["http"], ports["metrics"]) == (args.port, args.http_port, args.metrics_port)
    assert head["readinessProbe"]["grpc"]["port"] == args.port
    # Nothing Ray binds on the head takes one of relay serve's ports: KubeRay's defaults for the
    # ray start parameters it fills in (its operator's constants), as overridden here.
    bound = dict(KUBERAY_HEAD_PORTS, **{k: int(v) for k, v in spec["headGroupSpec"]["rayStartParams"].items()
                                        if k in KUBERAY_HEAD_PORTS})
    relay_ports = {args.port, args.http_port, args.metrics_port}
    assert not relay_ports & set(bound.values()), f"relay serve {sorted(relay_ports)} vs Ray's {bound}"
    # relay serve starts once the workers' GPUs have joined (they download the weights first)
    (wanted,) = re.findall(r'get\("GPU", 0\) < (\d+)', head["args"][0])
    assert int(wanted) == args.nproc * args.replicas
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    # the weights: the served folder, fetched once per node into the hostPath /models
    assert args.model == [MODEL_DIR]
    tokens = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}["tokens"]
    assert args.token == f"@{tokens}/tokens.txt"
    for name, template in templates.items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == RELAY_UID
        (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
        assert models["hostPath"]["path"] == "/models", name
        (fetch,) = pod["initContainers"]
        assert fetch["name"] == "fetch-weights" and fetch["command"] == ["/bin/bash", "-c"], name
        _check_fetch(fetch["args"][0])
        for container in pod["initContainers"] + pod["containers"]:
            assert container["image"] == IMAGE, name
            assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"], name
        (ray_container,) = pod["containers"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in ray_container["args"][0], name


def test_kuberay_container_scripts_pass_shellcheck():
    for name, template in _pod_templates(_kuberay_docs()["RayCluster"]).items():
        for container in template["spec"]["initContainers"] + template["spec"]["containers"]:
            assert container["command"] == ["/bin/bash", "-c"]
            _assert_shellcheck_clean(container["args"][0], f"{name}/{container['name']}")


# --------------------------------------------------------------------------- the Dockerfile


def _dockerfile():
    """The Dockerfile as dockerfile-parse reads it (instructions, ARG defaults, base image)."""
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))


def _dockerfile_args() -> dict[str, str]:
    return _dockerfile().args


def _instructions(name: str) -> list[str]:
    return [i["value"] for i in _dockerfile().structure if i["instruction"] == name]


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[name.lower()] = version
    return out


def _hadolint(path: Path) -> list[dict]:
    out = subprocess.run([_tool("hadolint"), "--no-color", "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout, out.stderr
    return json.loads(out.stdout)


def test_dockerfile_passes_hadolint():
    findings = _hadolint(DOCKERFILE)
    assert not findings, "; ".join(f"{f['code']} line {f['line']}: {f['message']}" for f in findings)


def test_hadolint_flags_a_careless_dockerfile(tmp_path):
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\n"
                        "RUN pip install torch\nCMD relay serve\n")
    codes = {f["code"] for f in _hadolint(careless)}
    assert {"DL3007", "DL3013", "DL3025"} <= codes, codes


def test_dockerfile_builds_relay_on_cuda_the_way_the_project_pins_it():
    parser = _dockerfile()
    assert not parser.is_multistage
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", parser.baseimage)
    assert match, parser.baseimage
    args = parser.args
    # the CUDA build of torch, from PyTorch's index for the base image's CUDA, at the project's pin
    assert args["TORCH_CUDA"] == f"cu{match.group(1)}{match.group(2)}"
    assert args["TORCH_VERSION"] == _pins(REPO / "requirements" / "cpu.txt")["torch"]
    gpu_pins = _pins(REPO / "requirements" / "gpu.txt")
    assert "torch" not in gpu_pins and args["RAY_VERSION"] == gpu_pins["ray"]
    runs = _instructions("RUN")
    torch_step = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in runs[torch_step]
    assert 'echo "torch==${TORCH_VERSION}+${TORCH_CUDA}" > /opt/relay/torch-constraint.txt' in runs[torch_step]
    # then the GPU pins and ray[default], then Relay with [engine]: both held to that torch
    assert "requirements/gpu.txt /opt/relay/requirements-gpu.txt" in _instructions("COPY")
    later = runs[torch_step + 1:]
    stack = next(run for run in later if "-r /opt/relay/requirements-gpu.txt" in run)
    relay = next(run for run in later if '"/opt/relay/src[engine]"' in run)
    for step in (stack, relay):
        assert "-c /opt/relay/torch-constraint.txt" in step
    assert '"ray[default]==${RAY_VERSION}"' in stack
    assert not any("cpu.txt" in value for value in runs + _instructions("COPY"))


def test_dockerfile_holds_no_weights_and_runs_as_a_user():
    everything = " ".join(i["value"] for i in _dockerfile().structure if i["instruction"] != "COMMENT")
    for fetch in ("hf download", "huggingface-cli", "snapshot_download", "from_pretrained"):
        assert fetch not in everything, fetch
    for source in _instructions("COPY") + _instructions("ADD"):
        assert not re.search(r"models|\.(safetensors|bin|pt|pth|ckpt|gguf)\b", source.split()[0]), source
    assert '["/models"]' in _instructions("VOLUME")
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "tests", "bench/results", "**/*.safetensors"} <= ignored
    structure = [i for i in _dockerfile().structure if i["instruction"] != "COMMENT"]
    users = [i for i in structure if i["instruction"] == "USER"]
    assert users and users[-1]["value"] == "${RELAY_UID}:${RELAY_UID}"
    assert _dockerfile_args()["RELAY_UID"] == str(RELAY_UID) != "0"
    last_user = structure.index(users[-1])
    assert all(i["instruction"] != "RUN" for i in structure[last_user:])
    assert any(f'useradd --create-home --uid "${{RELAY_UID}}"' in run for run in _instructions("RUN"))


def test_dockerfile_entry_point_is_relay_serve():
    (cmd,) = _instructions("CMD")
    argv = json.loads(cmd)
    assert argv[0] == "relay"
    args = _relay_args(argv[1:])
    assert args.command == "serve" and args.host == "0.0.0.0" and args.model == [MODEL_DIR]
    exposed = {int(p) for value in _instructions("EXPOSE") for p in value.split()}
    assert {args.port, args.metrics_port, args.http_port, 6379, 8265} <= exposed
    # one 8-GPU machine, the layout the runbook's plan picks for it
    assert (args.device, args.nproc, args.layout) == ("cuda", GPUS_PER_NODE, "cfg=2,ring=4,fsdp=4")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dockerfile_health_probe_reads_grpc_health():
    """The HEALTHCHECK's own probe, run against a real grpc.health.v1 server on a free port:
    0 while it says SERVING, 1 while NOT_SERVING."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    (check,) = _instructions("HEALTHCHECK")
    options, _, probe = check.partition(" CMD ")
    assert "--start-period=" in options
    argv = json.loads(probe)
    assert argv[:2] == ["python", "-c"] and "127.0.0.1:50051" in argv[2]
    port = _free_port()
    code = argv[2].replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        for status, expected in ((health_pb2.HealthCheckResponse.SERVING, 0),
                                 (health_pb2.HealthCheckResponse.NOT_SERVING, 1)):
            servicer.set("", status)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert out.returncode == expected, out.stderr
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- the runbook


def _bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", RUNBOOK.read_text(), flags=re.S | re.M)


def _runbook_commands() -> list[list[str]]:
    """Every command line of the runbook's bash blocks, continuation lines joined, as words."""
    out = []
    for block in _bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(shlex.split(line))
    return out


def _pipeline_heads(words: list[str]) -> list[list[str]]:
    """The simple commands of a pipeline (``a | b``), each as words."""
    out, current = [], []
    for word in words:
        if word == "|":
            out.append(current)
            current = []
        else:
            current.append(word)
    return out + [current]


def _relay_lines() -> list[list[str]]:
    """Every ``relay`` invocation of the runbook, direct or run on the head by ``ray exec``."""
    out = []
    for words in _runbook_commands():
        if words[0] == "relay":
            out.append(words[1:])
        elif words[:2] == ["ray", "exec"]:
            inner = shlex.split(_ray_command(words[1:]).params["cmd"])
            if inner[0] == "relay":
                out.append(inner[1:])
    return out


def test_runbook_shell_blocks_pass_bash_and_shellcheck():
    blocks = _bash_blocks()
    assert len(blocks) >= 10
    for block in blocks:
        out = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{out.stderr}\n{block}"
        # SC1091: the workstation's `source .venv/bin/activate` is not this script's to follow
        _assert_shellcheck_clean(block, block.splitlines()[0], exclude=("SC1091",))
    for words in _runbook_commands():
        for command in _pipeline_heads(words):
            assert command[0] in PROGRAMS, shlex.join(words)


def test_runbook_relay_commands_parse_with_relays_parser():
    lines = _relay_lines()
    commands = {_relay_args(argv).command for argv in lines}
    assert {"plan", "serve", "submit", "bench"} <= commands
    with pytest.raises(AssertionError, match="rejected"):
        _relay_args(["plan", "--gpu", "a6000", "--model", "t2v-a14b", "--gpu-count", "8"])


def test_runbook_ray_commands_parse_with_rays_cli():
    seen = set()
    for words in _runbook_commands():
        if words[0] != "ray":
            continue
        ctx = _ray_command(words[1:])
        seen.add(words[1])
        config = ctx.params.get("cluster_config_file")
        if config:
            assert (REPO / config).resolve() == RAY_YAML, config
    assert {"up", "exec", "rsync-up", "rsync-down", "down"} <= seen


def test_runbook_deletes_the_weights_on_every_machine_it_puts_them_on():
    """Each route ends by deleting the weights on every machine it used (rented machines go back
    clean): the machines of its ``ssh`` lines, head included."""
    text = RUNBOOK.read_text()
    launcher, kuberay = text.split("## 4. KubeRay route")
    launcher = launcher.split("## 3. Ray cluster launcher route")[1]
    for name, section in (("launcher", launcher), ("kuberay", kuberay)):
        words = [w for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
                 for line in block.splitlines() if line.strip() for w in [shlex.split(line)]]
        hosts = {w[1] for w in words if w[0] == "ssh" and "@" in w[1]}
        cleaned = {w[1] for w in words if w[0] == "ssh" and w[2:5] == ["sudo", "rm", "-rf"]
                   and w[5] == f"{MODEL_DIR}"}
        assert len(hosts) >= 2 and cleaned == hosts, (name, hosts, cleaned)


def test_runbook_files_and_image_are_the_kits():
    for words in _runbook_commands():
        if words[:2] == ["docker", "build"]:
            assert words[words.index("-f") + 1] == "launch/cluster/Dockerfile"
            assert words[words.index("-t") + 1] == IMAGE
        if words[0] == "kubectl" and words[1] in ("apply", "delete") and "-f" in words:
            assert (REPO / words[words.index("-f") + 1]).resolve() == KUBERAY_YAML
    assert _ray_config()["docker"]["image"] == IMAGE


def test_runbook_plan_commands_run(relay):
    """Every ``relay plan`` line of the runbook runs here (no GPU) and says what the runbook
    reads from it: the A6000 is the planner's, the served layout fits, one GPU does not."""
    plans = [argv for argv in _relay_lines() if argv[0] == "plan"]
    assert len(plans) >= 6
    for argv in plans:
        result = relay(*argv)
        assert result.code == 0, f"relay {shlex.join(argv)}: {result.err}"
        args = _relay_args(argv)
        assert args.gpu == "a6000"
        if args.json:
            (row,) = json.loads(result.out)
            assert row["feasible"], argv
        else:
            assert "x a6000 (NVIDIA RTX A6000 48GB" in result.out, argv
        if args.layout == "ulysses=1":
            assert re.search(r"single .* no\n", result.out), result.out
        elif args.layout:
            assert re.search(r" yes\n", result.out) or args.json, result.out


def test_runbook_serves_and_measures_what_it_plans():
    config = _ray_config()
    nodes = 1 + len(config["provider"]["worker_ips"])
    lines = [_relay_args(argv) for argv in _relay_lines()]
    plans = [a for a in lines if a.command == "plan"]
    (serve,) = [a for a in lines if a.command == "serve"]
    # the cluster's every GPU in groups of one machine, the layout the plan priced, the weights
    # the setup commands fetched, the tokens rsync-up put there
    assert (serve.executor, serve.ray_address, serve.device, serve.host) == ("ray", "auto", "cuda", "0.0.0.0")
    assert serve.nproc * serve.replicas == nodes * GPUS_PER_NODE and serve.nproc <= GPUS_PER_NODE
    assert any(p.layout == serve.layout and p.gpus == serve.nproc for p in plans)
    assert serve.model == [MODEL_DIR]
    uploads = [w for w in _runbook_commands() if w[:2] == ["ray", "rsync-up"]]
    assert [f"@{w[-1]}" for w in uploads] == [serve.token]
    kuberay_serve = _relay_args(_served_command(
        _container(_pod_templates(_kuberay_docs()["RayCluster"])["head"], "ray-head")["args"][0]))
    assert (kuberay_serve.nproc, kuberay_serve.layout, kuberay_serve.replicas) == (
        serve.nproc, serve.layout, serve.replicas)
    # the bench's sizes side by side with a plan of the same layout and request
    (bench,) = [a for a in lines if a.command == "bench"]
    assert bench.bench == "scaling" and bench.ray_address == "auto" and bench.gpu == "a6000"
    assert bench.model == MODEL_DIR
    for n in map(int, bench.gpus.split(",")):
        assert n <= GPUS_PER_NODE
        assert any(p.layout == f"ulysses={n},fsdp={n}" and p.size == f"{bench.width}x{bench.height}"
                   and p.frames == bench.frames and p.steps == bench.steps for p in plans), n
