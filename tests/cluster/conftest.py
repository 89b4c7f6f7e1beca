"""Real Ray nodes on loopback for the cluster tests, stopped by their own process ids.

Each node is `ray start --block` in a session of its own. Stopping one ends every process of
that session (TERM, then KILL), found in /proc, so Ray's workers, agents and the fake
autoscaler's nodes go too even when their parents went first; it waits until they are gone,
and runs when the test fails as well. Never `ray stop`: it ends every Ray on the machine,
other tests' embedded ones included.

All nodes run with token authentication, the token in RAY_AUTH_TOKEN (never in a file).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = Path(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
            except OSError:
                continue
    return members


class RayNode:
    """`ray start --block ARGS` run by `python`, in its own session, logging to log_path."""

    def __init__(self, python: Path, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen([str(python), "-m", "ray.scripts.scripts", "start", "--block", *args],
                                            env=env, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        sid = self.process.pid
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):
            members = _session_members(sid)
            for pid in members:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.process.poll()  # reap our own child; the others are reaped by their parents or init
                alive = [pid for pid in _session_members(sid) if not _is_zombie(pid)]
                if not alive:
                    return
                time.sleep(0.5)
        raise RuntimeError(f"Ray processes {alive} of session {sid} survived SIGKILL")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class LoopbackCluster:
    """A head and more nodes on 127.0.0.1, all with the same fresh token; stop() ends them all."""

    def __init__(self, root: Path):
        self.root = root
        # Ray's socket paths have a length limit: a short temp dir of our own, under /tmp
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.nodes: list[RayNode] = []
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"

    def env(self, python: Path = VENV_PYTHON, **extra: str) -> dict[str, str]:
        """The environment of a node or client: its venv first on PATH, token auth on, CPU DeepSpeed."""
        return {**os.environ, "PATH": f"{python.parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token, "DS_ACCELERATOR": "cpu", **extra}

    def start_head(self, *args: str, python: Path = VENV_PYTHON, env: dict[str, str] | None = None) -> RayNode:
        node = self._start("head", python, env, [
            "--head", "--node-ip-address", "127.0.0.1", "--port", self.gcs.rpartition(":")[2],
            "--dashboard-host", "127.0.0.1", "--dashboard-port", self.dashboard.rpartition(":")[2],
            "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats", *args])
        wait_until(lambda: self._dashboard_up(node), 120, f"the Ray dashboard at {self.dashboard}", node)
        return node

    def add_node(self, *args: str, python: Path = VENV_PYTHON) -> RayNode:
        """A worker node. It gets a temp dir of its own, as a separate machine would have: sharing the
        head's, its runtime-env agent unpacked a job's working_dir again under the running driver."""
        temp_dir = self.temp_dir / f"node{len(self.nodes)}"
        return self._start(f"node{len(self.nodes)}", python, None, [
            "--address", self.gcs, "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir), *args])

    def _start(self, name: str, python: Path, env: dict[str, str] | None, args: list[str]) -> RayNode:
        args += ["--dashboard-agent-listen-port", str(free_port())]
        node = RayNode(python, args, env or self.env(python), self.root / f"ray-{name}.log")
        self.nodes.append(node)
        return node

    def _dashboard_up(self, head: RayNode) -> bool:
        head.check_running()
        try:
            urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
        except urllib.error.HTTPError:
            pass  # it answered (401 without the token): the job server is up
        except OSError:
            return False
        return True

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's State API (the dashboard's /api/v0), as `ray list` reads it, with our token."""
        query = {"limit": "1000", "detail": "1", "filter_keys": list(filters),
                 "filter_predicates": ["="] * len(filters), "filter_values": list(filters.values())}
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{resource}?{urllib.parse.urlencode(query, doseq=True)}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        """The alive nodes, once there are `count` of them."""
        wait_until(lambda: len(self.alive_nodes()) >= count, timeout, f"{count} alive Ray nodes")
        return self.alive_nodes()

    def submit(self, *entrypoint: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
        """`ray job submit` of entrypoint from the repository root, as the README shows; returns the
        finished `ray job submit` (it waits for the job and prints its output)."""
        return subprocess.run(
            [str(VENV_PYTHON.parent / "ray"), "job", "submit", "--address", self.dashboard,
             "--working-dir", str(REPO), "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--",
             *entrypoint], env=self.env(**extra_env), cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        errors = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception as err:  # stop the others all the same
                errors.append(err)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def logs(self) -> str:
        return "\n".join(f"--- {n.log_path.name}\n{n.log_tail(1500)}" for n in self.nodes)


def wait_until(condition, timeout: float, what: str, node: RayNode | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s" + (f":\n{node.log_tail()}" if node else ""))


@pytest.fixture
def unused_port() -> int:
    """A loopback port where nothing listens (as far as anyone can know)."""
    return free_port()


@pytest.fixture
def loopback_cluster(tmp_path):
    cluster = LoopbackCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def deps_only_python(tmp_path_factory) -> Path:
    """The python of a virtualenv that has the project's dependencies but not the project: it sees
    this venv's site-packages through a path in a .pth file, without that folder's own .pth files,
    so the editable install's finder (which maps `trainer` to this checkout) is not loaded. A Ray
    node started with it can run our code only from a job's uploaded working_dir."""
    venv = tmp_path_factory.mktemp("deps-only-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import ray, torch\ntry:\n import trainer\nexcept ImportError:\n pass\n"
                            "else:\n raise SystemExit('trainer is importable: ' + trainer.__file__)"],
                           cwd=venv, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    return python
