"""`ray start --head` on loopback + `ray job submit` of a short training job, as the README shows.

The head runs as `ray start --block` in its own process group, which the fixture ends (TERM,
then KILL) also when the test fails; never `ray stop`, which would end every Ray on the machine.
"""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A Ray head on 127.0.0.1 with token auth; yields (dashboard address, client env)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    dashboard = _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "DS_ACCELERATOR": "cpu"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
         "--num-cpus", "3", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for(address, head)
        yield address, env
    finally:
        _end_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for(address: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered (401 without the token): the job server is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {address} did not come up in {timeout} s")


def _end_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_job_submit_trains_on_a_head_node(head_node, tiny_dataset, tmp_path):
    address, env = head_node
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--",
         "u-mask", "train", "--config", "configs/tiny.yaml",
         f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
         f"ray.storage_path={tmp_path / 'runs'}", "ray.name=submitted", "train.steps=4",
         "train.checkpoint_every=4", "train.log_every=2"],
        env=env, capture_output=True, text=True, timeout=600)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-4000:]
    assert re.search(r"Job '\S+' succeeded", output), output[-4000:]
    assert "step 4/4" in output
    assert list((tmp_path / "runs" / "submitted").glob("checkpoint_*/manifest-rank1.json"))
