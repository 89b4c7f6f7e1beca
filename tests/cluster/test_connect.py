"""`u-mask train` against a wrong cluster address, a dead head, or a missing or wrong token:
one `u-mask: error` line within seconds that names the variable and what to do, never a
traceback or a hang (trainer/training/cluster.py). The token cases run against a real
token-auth head on loopback; HOME points at a temporary folder, so the machine's own
~/.ray/auth_token plays no part.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.training.cluster import check_cluster
from umask.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *overrides):
    return load_config([str(REPO / "configs" / "tiny.yaml")],
                       [f"data.features={tmp_path / 'features'}", f"ray.storage_path={tmp_path / 'runs'}",
                        *overrides])


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No address, no token, no auth mode, and a HOME without ~/.ray/auth_token."""
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return monkeypatch


def _refusal(cfg) -> str:
    with pytest.raises(UserError) as err:
        check_cluster(cfg)
    return str(err.value)


def test_embedded_ray_needs_no_cluster_checks(clean_env, tmp_path):
    check_cluster(load_config([str(REPO / "configs" / "tiny.yaml")], []))  # relative paths are fine here
    check_cluster(load_config([str(REPO / "configs" / "tiny.yaml")], ["ray.address=local"]))


def test_relative_paths_are_refused_on_a_cluster(clean_env, tmp_path):
    clean_env.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    message = _refusal(load_config([str(REPO / "configs" / "tiny.yaml")], []))
    assert message.startswith("data.features=data/demo/features and ray.storage_path=runs are relative, "
                              "and this run joins the Ray cluster at RAY_ADDRESS=127.0.0.1:6379"), message
    assert "every node mounts" in message and "outlives the cluster" in message
    message = _refusal(_cfg(tmp_path, "ray.storage_path=runs", "ray.address=127.0.0.1:6379"))
    assert message.startswith("ray.storage_path=runs is relative, and this run joins the Ray cluster at "
                              "ray.address=127.0.0.1:6379"), message


def test_featurize_under_a_job_refuses_relative_features(clean_env, capsys):
    from trainer.cli import main
    from trainer.training.cluster import require_absolute_under_job

    require_absolute_under_job(**{"data.features": "data/demo/features"})  # not under a job: fine
    clean_env.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets
    require_absolute_under_job(**{"data.features": "/mnt/shared/features"})
    assert main(["data", "featurize", "--config", str(REPO / "configs" / "tiny.yaml")]) == 2
    assert capsys.readouterr().err.startswith(
        "u-mask: error: data.features=data/demo/features is relative, and this command runs under "
        "`ray job submit`, where a relative path resolves in the job's temporary copy of the upload")


@pytest.mark.parametrize("address, expected", [
    ("http://127.0.0.1:8265", "RAY_ADDRESS=http://127.0.0.1:8265 is the address of the Ray job server"),
    ("ray://127.0.0.1:10001", "RAY_ADDRESS=ray://127.0.0.1:10001: `u-mask train` joins a cluster at the head's GCS"),
    ("head-node", "RAY_ADDRESS=head-node is not a Ray cluster address"),
    ("no-such-host.invalid:6379", "RAY_ADDRESS=no-such-host.invalid:6379: unknown host"),
], ids=["job-server", "ray-client", "no-port", "unknown-host"])
def test_addresses_that_are_not_a_cluster(clean_env, tmp_path, address, expected):
    clean_env.setenv("RAY_ADDRESS", address)
    assert _refusal(_cfg(tmp_path)).startswith(expected)


def test_nothing_listening_is_one_line_from_the_cli(clean_env, tmp_path, unused_port):
    """The issue's hang: RAY_ADDRESS=127.0.0.1:<closed port> retried for more than 5 minutes."""
    address = f"127.0.0.1:{unused_port}"
    clean_env.setenv("RAY_ADDRESS", address)
    finished = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", "configs/tiny.yaml",
                               f"data.features={tmp_path / 'features'}", f"ray.storage_path={tmp_path / 'runs'}"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert finished.stderr.splitlines() == [
        f"u-mask: error: nothing answers at RAY_ADDRESS={address} (connection refused): the Ray head is not "
        "running there or the address is wrong. Start the head (`ray start --head`), or fix the address: the "
        "head's GCS, host:6379 by default; unset it to train on an embedded Ray on this machine"], finished.stderr
    assert not (tmp_path / "runs").exists(), "the driver wrote the run folder before joining"


@pytest.mark.slow
@pytest.mark.cluster
def test_token_problems_against_a_real_head(loopback_cluster, clean_env, tmp_path):
    cluster = loopback_cluster
    cluster.start_head("--num-cpus", "0")
    shown = f"RAY_ADDRESS={cluster.gcs}"
    clean_env.setenv("RAY_ADDRESS", cluster.gcs)
    cfg = _cfg(tmp_path)

    assert _refusal(cfg) == (
        f"the Ray cluster at {shown} requires token authentication, and this process has none (RAY_AUTH_MODE is "
        "unset, RAY_AUTH_TOKEN is unset): export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token, "
        "from the secret the head was started with> (docs/cluster.md)")

    token_file = Path.home() / ".ray" / "auth_token"
    token_file.parent.mkdir()
    token_file.write_text(cluster.token)
    assert _refusal(cfg) == (
        f"the Ray cluster at {shown} requires token authentication, and the token in ~/.ray/auth_token was "
        "not sent because RAY_AUTH_MODE is unset: export RAY_AUTH_MODE=token")
    token_file.unlink()

    clean_env.setenv("RAY_AUTH_TOKEN", cluster.token)
    assert "the token in RAY_AUTH_TOKEN was not sent because RAY_AUTH_MODE is unset: export RAY_AUTH_MODE=token" \
        in _refusal(cfg)

    clean_env.setenv("RAY_AUTH_MODE", "token")
    clean_env.setenv("RAY_AUTH_TOKEN", "0" * 64)
    assert _refusal(cfg) == (
        f"the Ray cluster at {shown} requires token authentication and refused the token in RAY_AUTH_TOKEN: it "
        "is not the token the head was started with; take the cluster's token from its secret (docs/cluster.md)")

    clean_env.delenv("RAY_AUTH_TOKEN")
    assert _refusal(cfg).startswith(f"RAY_AUTH_MODE=token, but this process has no Ray auth token to join the "
                                    f"cluster at {shown}")

    clean_env.setenv("RAY_AUTH_TOKEN", cluster.token)
    dashboard_port = cluster.dashboard.rpartition(":")[2]
    clean_env.setenv("RAY_ADDRESS", f"127.0.0.1:{dashboard_port}")
    assert _refusal(cfg).startswith(f"RAY_ADDRESS=127.0.0.1:{dashboard_port} answers, but not as a Ray cluster")

    clean_env.setenv("RAY_ADDRESS", cluster.gcs)
    check_cluster(cfg)  # the right token: no complaint

    cluster.stop()  # a dead head
    assert _refusal(cfg).startswith(f"nothing answers at {shown} (connection refused)")
