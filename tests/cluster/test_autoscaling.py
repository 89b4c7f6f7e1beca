"""Autoscaling on one machine: a `u-mask train` job that asks for more than the cluster has makes
Ray's autoscaler start a worker node, and the job completes on it.

Ray's fake multi-node provider (ray.autoscaler._private.fake_multi_node) stands in for a cloud:
it "launches" a node by starting a raylet on this machine. The head offers no CPU, as the heads of
cluster/aws.yaml and cluster/gcp.yaml do, and the worker type offers 2 CPUs, 0 to 2 nodes; the
job's 2 workers of 1 CPU each fit on one such node. Those nodes share the head's temp dir, so the
job takes its code from this venv's install rather than from an upload (test_job_submit.py
covers the upload).
"""
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config


REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

FAKE_CLUSTER = {
    "cluster_name": "umask-fake",
    "max_workers": 2,
    "idle_timeout_minutes": 1,
    "upscaling_speed": 1.0,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {"ssh_user": "ray"},
    "head_node_type": "ray.head.default",  # the fake provider's name for the head
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


def test_autoscaler_adds_a_node_for_the_job(loopback_cluster, tiny_dataset, tmp_path):
    cluster = loopback_cluster
    config = copy.deepcopy(FAKE_CLUSTER)
    # without it the fake nodes dial port 6379 on the machine's address and never join
    config["provider"]["gcs_address"] = cluster.gcs
    validate_config(config)  # the schema only: prepare_config reads an example.yaml the wheel lacks
    config_path = tmp_path / "fake-cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cluster.start_head("--num-cpus", "0", f"--autoscaling-config={config_path}",
                       env=cluster.env(RAY_FAKE_CLUSTER="1"))
    head_nodes = cluster.wait_for_nodes(1)
    assert len(head_nodes) == 1, head_nodes  # no worker node before the job asks for one

    storage = tmp_path / "runs"
    submitted = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--",
         "u-mask", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
         f"data.features={tiny_dataset / 'features'}", f"ray.storage_path={storage}", "ray.name=autoscaled",
         "ray.num_workers=2", "ray.cpus_per_worker=1", "train.steps=2", "train.checkpoint_every=2",
         "train.log_every=1"],
        env=cluster.env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:] + cluster.logs()
    assert re.search(r"Job '\S+' succeeded", output), output[-4000:]
    assert [m.name for m in sorted((storage / "autoscaled").glob("checkpoint_*/manifest-rank*.json"))] == \
        ["manifest-rank0.json", "manifest-rank1.json"]

    nodes = cluster.state("nodes")
    added = [n for n in nodes if n["node_id"] != head_nodes[0]["node_id"]]
    workers = cluster.state("actors", class_name="RayTrainWorker")
    print(f"nodes: {[(n['node_id'][-6:], n['state'], n['resources_total']) for n in nodes]}; "
          f"workers on: {[w['node_id'][-6:] for w in workers]}")
    assert added, f"the autoscaler started no node: {nodes}\n{cluster.logs()}"
    assert {w["node_id"] for w in workers} <= {n["node_id"] for n in added}, \
        f"training workers ran on the head: {workers}"
