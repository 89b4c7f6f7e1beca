"""Runs a function on 2 real processes joined by a process group on 127.0.0.1 (gloo by default).

`run_two_ranks(fn, *args)` spawns rank 0 and rank 1 (or `world_size` ranks), calls
`fn(rank, pg, *args)` in each and returns their results in rank order. A rank's exception comes back as a RuntimeError carrying
its traceback. The process group is destroyed in each rank, and the processes are killed by
their own handles if they are still alive when the call ends (failure or timeout).
"""
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, backend, fn, args, results, received):
    torch.set_num_threads(1)  # two ranks share a 2-core machine
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        results.put((rank, None, fn(rank, dist.group.WORLD, *args)))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    finally:
        # Tensors cross the queue as shared-memory handles that die with this process:
        # stay alive until the parent has unpickled them.
        received.wait(timeout=60)
        dist.destroy_process_group()


def run_two_ranks(fn, *args, backend: str = "gloo", timeout: float = 120.0,
                  world_size: int = WORLD_SIZE) -> list:
    ctx = mp.get_context("spawn")
    results, received = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(rank, world_size, port, backend, fn, args, results, received))
             for rank in range(world_size)]
    try:
        for proc in procs:
            proc.start()
        by_rank, failures = {}, []
        for _ in range(world_size):
            try:
                rank, error, value = results.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"ranks {sorted(set(range(world_size)) - set(by_rank))} "
                                   f"gave no result within {timeout} s") from None
            if error is not None:
                failures.append(f"rank {rank}:\n{error}")
                break  # the other rank is likely stuck in a collective; stop waiting
            by_rank[rank] = value
        if failures:
            raise RuntimeError("\n".join(failures))
        received.set()
        for proc in procs:
            proc.join(timeout=30)
        return [by_rank[rank] for rank in range(world_size)]
    finally:
        received.set()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
