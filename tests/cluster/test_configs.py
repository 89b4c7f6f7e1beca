"""The cluster configs of cluster/: Ray cluster-launcher YAML validated by the validator in the
`ray` package (as `ray up` validates it), KubeRay manifests validated against the KubeRay CRDs'
OpenAPI schemas in ../shared/kuberay-crds/, and the fields that matter checked one by one: the
image, the entrypoint (loaded with our own config loader), resources, autoscaling bounds, the
token's secret reference, and where checkpoints go. No Kubernetes API server or cloud account
runs here; these are the checks that can run without one.
"""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRDS = REPO.parent / "shared" / "kuberay-crds"
IMAGE_REPO = "/home/ray/umask-trainer"  # where cluster/Dockerfile puts this repository
SHARED = "/mnt/shared"  # where every node and pod mounts the shared storage
LAUNCHER = ["aws.yaml", "gcp.yaml"]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _yaml(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


# --- Ray cluster launcher ---------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_validator(name):
    config = _yaml(name)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before it talks to the cloud


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_shape(name):
    config = _yaml(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must offer no CPU to training workers"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in (CLUSTER / name).read_text(), "nothing may listen on every address"

    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU")]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] == 8, "one 8-GPU worker type (xl: 8 workers a node)"
    assert cpu, "a CPU worker type"
    for kind in workers.values():
        assert kind["min_workers"] == 0 < kind["max_workers"] <= config["max_workers"], kind
    assert 0 < config["idle_timeout_minutes"] <= 30

    # setup: node_setup.sh on every node; the GPU type asks install.sh for its CUDA variant
    gpu_setup = " ".join(gpu[0]["worker_setup_commands"])
    assert "UMASK_ACCEL=cuda" in gpu_setup and "cluster/node_setup.sh" in gpu_setup
    common_setup = " ".join(config["setup_commands"])
    for setup in (gpu_setup, common_setup):
        assert "UMASK_SHARED_NFS=" in setup and "UMASK_TOKEN_COMMAND=" in setup
        assert re.search(r"aws secretsmanager get-secret-value|gcloud secrets versions access", setup)
    assert config["head_setup_commands"], "set explicitly: Ray's default runs a bare pip outside the venv"
    assert config["file_mounts"] == {"~/umask-trainer": "."} and ".gitignore" in config["rsync_filter"]


def test_node_setup_installs_the_stack_mounts_storage_and_fetches_the_token():
    script = (CLUSTER / "node_setup.sh").read_text()
    subprocess.run(["bash", "-n", str(CLUSTER / "node_setup.sh")], check=True)
    assert 'bash "$REPO/cluster/install.sh" "$VENV"' in script
    assert "mount -t nfs4" in script and "SHARED_DIR=${UMASK_SHARED_DIR:-/mnt/shared}" in script
    assert "umask 077" in script and ".ray/auth_token" in script and "export RAY_AUTH_MODE=token" in script


# --- KubeRay ----------------------------------------------------------------------------------

def _strict(schema):
    """The CRD schema as a strict API server applies it (kubectl's default field validation
    rejects unknown fields): objects with listed properties take no others."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schemas():
    if not CRDS.is_dir():
        pytest.skip(f"the KubeRay CRDs are not at {CRDS} (see ../shared/kuberay-crds/README.md): "
                    "the KubeRay manifests are NOT validated")
    schemas = {}
    for path in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            schemas[(f"ray.io/{version['name']}", crd["spec"]["names"]["kind"])] = \
                _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _validate(manifest, schemas):
    schema = schemas[(manifest["apiVersion"], manifest["kind"])]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def _ray_containers(cluster_spec):
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, group, group["template"]["spec"]["containers"][0]) for name, group in groups]


def test_kuberay_manifests_pass_the_crd_schemas(crd_schemas):
    raycluster, rayjob = _yaml("kuberay/raycluster.yaml"), _yaml("kuberay/rayjob.yaml")
    _validate(raycluster, crd_schemas)
    _validate(rayjob, crd_schemas)
    # the strict schema does catch a typo
    broken = copy.deepcopy(raycluster)
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(AssertionError, match="maxReplica"):
        _validate(broken, crd_schemas)


def test_raycluster_fields_that_matter():
    spec = _yaml("kuberay/raycluster.yaml")["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token", "secretName": "umask-ray-auth"}
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    gpu_groups = []
    for name, group, container in _ray_containers(spec):
        assert container["image"] == f"registry.example.com/umask-trainer:{VERSION}", name
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests and {"cpu", "memory"} <= set(limits), name
        assert {"name": "shared", "mountPath": SHARED} in container["volumeMounts"], name
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "umask-shared"}} in \
            group["template"]["spec"]["volumes"], name
        assert not any(e["name"].startswith("RAY_AUTH") for e in container.get("env", [])), \
            "the operator sets the token from authOptions"
        assert not group["template"]["spec"].get("hostNetwork"), name
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            if "nvidia.com/gpu" in limits:
                gpu_groups.append((group, int(limits["nvidia.com/gpu"])))
    assert [gpus for _, gpus in gpu_groups] == [8]
    pvc = _yaml("kuberay/shared-pvc.yaml")
    assert pvc["metadata"]["name"] == "umask-shared" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_fields_that_matter():
    job = _yaml("kuberay/rayjob.yaml")["spec"]
    assert job["rayClusterSpec"] == _yaml("kuberay/raycluster.yaml")["spec"], \
        "rayjob.yaml's cluster drifted from raycluster.yaml"
    assert 0 < job["activeDeadlineSeconds"] <= 7 * 24 * 3600
    assert 0 <= job["backoffLimit"] <= 3
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}, "the code comes from the image, not an upload"

    command = shlex.split(job["entrypoint"])
    assert command[:4] == ["u-mask", "train", "--config", f"{IMAGE_REPO}/configs/xl.yaml"]
    cfg = load_config([str(REPO / Path(command[3]).relative_to(IMAGE_REPO))], command[4:])
    assert cfg.data.features.startswith(f"{SHARED}/") and cfg.ray.storage_path.startswith(f"{SHARED}/")
    assert cfg.ray.use_gpu and cfg.train.resume
    gpu_group = next(g for g in job["rayClusterSpec"]["workerGroupSpecs"]
                     if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"])
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pods = -(-cfg.ray.num_workers // int(limits["nvidia.com/gpu"]))
    assert pods <= gpu_group["maxReplicas"], "the job asks for more GPU pods than the group may have"
    assert cfg.ray.cpus_per_worker * int(limits["nvidia.com/gpu"]) <= int(limits["cpu"])


def test_image_is_built_with_the_cuda_stack():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert "UMASK_ACCEL=cuda" in dockerfile and "cluster/install.sh /home/ray/venv" in dockerfile
    assert f"COPY --chown=ray:users . {IMAGE_REPO}" in dockerfile
    assert f"-t registry.example.com/umask-trainer:{VERSION} ." in dockerfile
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {"/.git", "/.venv", "/data", "/runs"} <= set(ignored) and "data" not in ignored


# --- secrets and docs -------------------------------------------------------------------------

def test_no_token_in_any_cluster_file():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        name = path.relative_to(REPO)
        assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), f"{name} holds something like a token"
        assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?\w", text), f"{name} sets RAY_AUTH_TOKEN to a value"
        assert "auth_token:" not in text and "kind: Secret" not in text, f"{name} defines a Secret"


def test_docs_cover_every_cluster_file():
    docs = (REPO / "docs" / "cluster.md").read_text()
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        assert str(path.relative_to(REPO)) in docs, f"docs/cluster.md does not mention {path.relative_to(REPO)}"
