"""Run a function as the ranks of a real gloo process group, each in a fresh spawned process.

DeepSpeed caches its process groups for the life of a process, so a test that builds Trainers
gets processes of its own. The processes are this test's own: they are joined, and killed by
their ids if they outlive the wait, also when the test fails.
"""
from __future__ import annotations

import datetime
import os
import queue
import time
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, timeout_s: float, env: dict, fn, args, results) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", **env})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        results.put((rank, None, fn(rank, *args)))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the test
        results.put((rank, (type(err).__name__, str(err), traceback.format_exc()), None))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, env: dict | None = None, collective_timeout_s: float = 300.0,
              wait_s: float = 900.0) -> dict[int, tuple]:
    """fn(rank, *args) on `world` gloo ranks -> {rank: (error or None, value)}.

    error is (exception type name, message, traceback). A rank that exits without a result
    (it could not import fn's module, or init failed: its stderr says why) counts as an error
    once every silent rank has exited, and one that gives none within wait_s counts as a
    timeout: the test fails instead of waiting.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(rank, world, port, collective_timeout_s, env or {}, fn, args, results))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    out: dict[int, tuple] = {}
    deadline = time.monotonic() + wait_s
    try:
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, error, value = results.get(timeout=5)
            except queue.Empty:
                # a rank that died before reporting (it could not unpickle fn, or init failed)
                # never will: stop waiting once every silent rank has exited
                if all(procs[r].exitcode is not None for r in range(world) if r not in out):
                    _drain(results, out)  # what an exiting rank flushed just now
                    break
                continue
            out[rank] = (error, value)
        for rank in range(world):
            code = procs[rank].exitcode
            why = (f"rank {rank} exited with code {code} before giving a result (its stderr says why)"
                   if code is not None else f"rank {rank} gave no result within {wait_s} s")
            out.setdefault(rank, (("Timeout" if code is None else "Died", why, ""), None))
        return out
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _drain(results, out: dict[int, tuple]) -> None:
    """Moves what is left in the results queue into out."""
    while True:
        try:
            rank, error, value = results.get(timeout=2)
        except queue.Empty:
            return
        out[rank] = (error, value)


def values(out: dict[int, tuple]) -> dict[int, object]:
    """The ranks' values; an AssertionError with the first rank's traceback if any rank failed."""
    for rank, (error, _) in sorted(out.items()):
        if error is not None:
            raise AssertionError(f"rank {rank} failed: {error[0]}: {error[1]}\n{error[2]}")
    return {rank: value for rank, (_, value) in out.items()}
