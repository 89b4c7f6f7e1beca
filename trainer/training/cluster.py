"""How `u-mask train` joins a Ray cluster (ray.address, else RAY_ADDRESS), and what it asks of paths there.

Ray's own ray.init turns a job-server address (http://head:8265) into a traceback, retries an
address where nothing listens for minutes, and answers a missing or wrong token with three
ConnectionError tracebacks after 20 s. check_cluster runs first, in seconds and before the
driver writes anything, and raises one UserError that names the key or variable and what to
do; join_cluster then calls ray.init. check_cluster looks at, in order:

1. the paths (require_shared_paths). On a cluster the driver is one process on one node, and
   under `ray job submit` its working directory is a temporary copy of the upload inside Ray's
   session folder. A relative data.features or ray.storage_path would resolve there: features
   missing, and checkpoints written where they vanish with the cluster. So both must be
   absolute paths on storage that every node mounts (or a URI for ray.storage_path).
   data.source is not read by training and is left alone.
2. the address's form: host:port of the head's GCS (6379 by default) or `auto`; the job
   server's http:// address and Ray Client's ray:// are refused with the right command.
3. a TCP connection to it (5 s): an unknown host, a dead head or a closed port.
4. a GCS client in a child process (killed after GCS_PROBE_TIMEOUT_S, so nothing hangs and
   Ray's C++ retry warnings stay off the terminal): a port that is not a Ray GCS, or the
   cluster refusing this process's token, saying which of RAY_AUTH_MODE, RAY_AUTH_TOKEN or the
   token file was missing or wrong.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from umask.errors import UserError

TCP_TIMEOUT_S = 5.0
GCS_PROBE_TIMEOUT_S = 10.0
DOCS = "docs/cluster.md"

_PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1])  # fetches the cluster id: the first authenticated call
except AuthenticationError:
    sys.exit(3)
except Exception as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(4)
"""


def cluster_address(ray_address: str | None) -> tuple[str, str] | None:
    """(where it was set, address) of the cluster to join; None for an embedded Ray on this machine."""
    if ray_address:
        source, address = "ray.address", ray_address
    elif os.environ.get("RAY_ADDRESS"):
        source, address = "RAY_ADDRESS", os.environ["RAY_ADDRESS"]
    else:
        return None
    return None if address == "local" else (source, address)


def check_cluster(cfg) -> None:
    """When cfg joins a cluster: its paths are absolute (require_shared_paths), and its address
    answers as a Ray cluster that takes this process's token. Before anything is written."""
    joined = cluster_address(cfg.ray.address)
    if joined is None:
        return
    require_shared_paths(cfg, *joined)
    source, address = joined
    shown = f"{source}={address}"
    target = _gcs_address(source, address)
    _check_reachable(target, shown)
    _probe_gcs(target, shown, auto=address == "auto")


def require_absolute_under_job(**paths: str) -> None:
    """Refuses relative output paths (key=value) under `ray job submit`, for commands other than
    train (`u-mask data featurize`): there they would land in the job's temporary working dir."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray's job supervisor for the entrypoint
        return
    relative = [f"{key}={value}" for key, value in paths.items() if "://" not in value and not Path(value).is_absolute()]
    if relative:
        raise UserError(
            f"{' and '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative, and this command runs "
            f"under `ray job submit`, where a relative path resolves in the job's temporary copy of the upload "
            f"({os.getcwd()}), deleted with the cluster. Give absolute paths on storage that every node mounts "
            f"and that outlives the cluster, e.g. data.features=/mnt/shared/features ({DOCS})")


def join_cluster(source: str, address: str, **init_kwargs) -> None:
    """ray.init(address=address, **init_kwargs), after check_cluster; a failure is one UserError."""
    import ray

    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as err:
        raise UserError(f"could not join the Ray cluster at {source}={address}: {err}") from None


def require_shared_paths(cfg, source: str, address: str) -> None:
    """Refuses relative data.features and ray.storage_path for a driver that joins a cluster."""
    relative = [f"{key}={value}" for key, value in (("data.features", cfg.data.features),
                                                    ("ray.storage_path", cfg.ray.storage_path))
                if "://" not in value and not Path(value).is_absolute()]
    if relative:
        raise UserError(
            f"{' and '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative, and this run joins the "
            f"Ray cluster at {source}={address}, where a relative path resolves in the driver's working "
            f"directory ({os.getcwd()}; under `ray job submit` a temporary copy of the upload that is "
            "deleted with the cluster, and that other nodes do not see). Give absolute paths on storage "
            "that every node mounts and that outlives the cluster, e.g. data.features=/mnt/shared/features "
            f"ray.storage_path=/mnt/shared/runs ({DOCS})")


def _gcs_address(source: str, address: str) -> str:
    """host:port of the GCS to check; resolves `auto` the way ray.init does."""
    scheme, sep, _ = address.partition("://")
    if sep and scheme in ("http", "https"):
        raise UserError(
            f"{source}={address} is the address of the Ray job server (the dashboard, for `ray job "
            "submit`), not of the cluster: run the training on the cluster with `ray job submit "
            f"--address {address} --working-dir . --runtime-env cluster/runtime_env.yaml -- u-mask train "
            f"...`, which sets RAY_ADDRESS for the job; or set {source} to the head's GCS, host:6379 "
            f"({DOCS})")
    if sep:
        raise UserError(
            f"{source}={address}: `u-mask train` joins a cluster at the head's GCS address, host:6379 "
            "(Ray Client's ray:// is not supported: the driver writes the run folder and follows "
            f"metrics.csv on its own disk). Submit it with `ray job submit` instead ({DOCS})")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            return canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise UserError(f"{source}=auto, but no Ray cluster was started on this machine with "
                            "`ray start`: start one, or give the head's address, host:6379") from None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"{source}={address} is not a Ray cluster address: give the head's GCS as "
                        f"host:port (6379 by default), or `auto` for the cluster started on this machine")
    return address


def _check_reachable(target: str, shown: str) -> None:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=TCP_TIMEOUT_S).close()
    except socket.gaierror as err:
        raise UserError(f"{shown}: unknown host {host!r} ({err.strerror}); give the Ray head's "
                        "address, host:6379") from None
    except OSError as err:
        reason = "no answer in 5 s" if isinstance(err, TimeoutError) else (err.strerror or str(err)).lower()
        raise UserError(
            f"nothing answers at {shown} ({reason}): the Ray head is not running there or the "
            "address is wrong. Start the head (`ray start --head`), or fix the address: the head's "
            "GCS, host:6379 by default; unset it to train on an embedded Ray on this machine") from None


def _probe_gcs(target: str, shown: str, auto: bool) -> None:
    env = dict(os.environ)
    if auto and "RAY_AUTH_MODE" not in env and _token_source() is not None:
        env["RAY_AUTH_MODE"] = "token"  # what ray.init does for `auto` when a token is at hand
    if env.get("RAY_AUTH_MODE", "").lower() == "token" and _token_source() is None:
        raise UserError(_token_problem(shown, "token"))  # Ray's C++ would abort the process
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, target], env=env, capture_output=True,
                               text=True, timeout=GCS_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"{shown} answers, but not as a Ray cluster within {GCS_PROBE_TIMEOUT_S:.0f} s: give the "
            "head's GCS address, host:6379 by default (8265 is the job server: submit with `ray job "
            f"submit --address http://HOST:8265 ...` instead) ({DOCS})") from None
    if probe.returncode == 3:
        raise UserError(_token_problem(shown, env.get("RAY_AUTH_MODE")))
    if probe.returncode != 0:
        said = [line for line in probe.stderr.splitlines() if line.strip() and not line.startswith(("/", "***"))]
        raise UserError(f"could not join the Ray cluster at {shown}: {(said or ['(no output)'])[-1][:400]}")


def _token_source() -> str | None:
    """Where this process would read a Ray auth token from, as Ray looks: the variable first."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).is_file() else None
    return "~/.ray/auth_token" if (Path.home() / ".ray" / "auth_token").is_file() else None


def _token_problem(shown: str, mode: str | None) -> str:
    where = _token_source()
    prefix = f"the Ray cluster at {shown} requires token authentication"
    if (mode or "").lower() != "token":
        state = "unset" if mode is None else f"{mode!r}"
        if where:
            return (f"{prefix}, and the token in {where} was not sent because RAY_AUTH_MODE is {state}: "
                    "export RAY_AUTH_MODE=token")
        return (f"{prefix}, and this process has none (RAY_AUTH_MODE is {state}, RAY_AUTH_TOKEN is unset): "
                "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token, from the secret the "
                f"head was started with> ({DOCS})")
    if where is None:
        return (f"RAY_AUTH_MODE=token, but this process has no Ray auth token to join the cluster at {shown} "
                "(none in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): export RAY_AUTH_TOKEN=<the "
                f"cluster's token, from the secret the head was started with> ({DOCS})")
    return (f"{prefix} and refused the token in {where}: it is not the token the head was started "
            f"with; take the cluster's token from its secret ({DOCS})")
