"""`ray job submit` of `u-mask train` to a real two-node Ray cluster on loopback, as the README shows.

The head runs from this virtualenv (the README: start the nodes with it active). The second
node runs from a virtualenv that has only the dependencies (conftest.deps_only_python): the
rank placed there imports our code from the job's uploaded working_dir and from nowhere else,
so a file missing from the upload fails the job (on the head, the editable install would
quietly fill the gap). Each node offers 1 CPU and the job asks for 2 workers of 1 CPU, so one
worker must run on each node; the test reads where they ran from Ray's State API.
"""
import re

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_job_trains_on_two_nodes_and_checkpoints_on_shared_storage(loopback_cluster, deps_only_python,
                                                                   tiny_dataset, tmp_path):
    cluster = loopback_cluster
    cluster.start_head("--num-cpus", "1")
    cluster.add_node("--num-cpus", "1", python=deps_only_python)

    # The README's old command, with the preset's relative paths: refused in seconds, by name,
    # instead of "manifest.json: missing" or a run left in Ray's temporary session folder.
    refused = cluster.submit("u-mask", "train", "--config", "configs/tiny.yaml", "ray.name=relative")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[-3000:]
    assert re.search(r"u-mask: error: data\.features=data/demo/features and ray\.storage_path=runs are "
                     r"relative, and this run joins the Ray cluster at RAY_ADDRESS=", output), output[-3000:]
    assert "Traceback" not in output, output[-3000:]

    nodes = cluster.wait_for_nodes(2)
    assert len(nodes) == 2, f"expected the head and one worker node, got {nodes}\n{cluster.logs()}"

    storage = tmp_path / "shared" / "runs"  # "shared storage": both nodes are on this machine
    submitted = cluster.submit(
        "u-mask", "train", "--config", "configs/tiny.yaml", f"data.features={tiny_dataset / 'features'}",
        f"ray.storage_path={storage}", "ray.name=two-nodes", "train.steps=4", "train.checkpoint_every=4",
        "train.log_every=2")
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:] + cluster.logs()
    assert re.search(r"Job '\S+' succeeded", output), output[-4000:]
    assert "step 4/4" in output, output[-4000:]
    run = storage / "two-nodes"
    assert [m.name for m in sorted(run.glob("checkpoint_*/manifest-rank*.json"))] == \
        ["manifest-rank0.json", "manifest-rank1.json"], f"no checkpoint of both ranks in {run}: {sorted(run.iterdir())}"

    workers = cluster.state("actors", class_name="RayTrainWorker")
    by_node = {}
    for actor in workers:
        by_node.setdefault(actor["node_id"], []).append(actor["state"])
    print(f"RayTrainWorker actors by node: {by_node}")  # shown with pytest -s
    assert set(by_node) == {node["node_id"] for node in nodes}, \
        f"the 2 training workers did not run one on each node: {by_node}, nodes {[n['node_id'] for n in nodes]}"
