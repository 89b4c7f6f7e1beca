"""Save and load the sharded tables and their fused optimizer state with torch.distributed.checkpoint.

Every rank calls both functions with the same path; each rank writes only its own shards
(replicated tables once) into DCP's rank-unique files. The storage is DCP's safetensors
layout (HuggingFaceStorageWriter/Reader with save_distributed): shard offsets live in each
file's JSON header, so loading parses JSON and raw tensors and never unpickles anything, which
DCP's default .metadata file would. The state saved is tensors only, weights and optimizer
accumulators; the optimizer's hyperparameters come from the config of the run that loads it.
"""
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from embeddings.sharded import ShardedTables
from trainer.errors import UserError


def _tensor_state(module: ShardedTables) -> dict[str, object]:
    """Flat fqn -> tensor (ShardedTensor for sharded tables), views of the live state."""
    state: dict[str, object] = {f"tables.{k}": v for k, v in module.dmp.state_dict().items()}
    for param, slots in module.optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {param}.{slot} is {type(value).__name__}, "
                                f"not a tensor; this checkpoint format holds tensors only")
            state[f"optimizer.{param}.{slot}"] = value
    return state


def save_sharded(module: ShardedTables, path: str | Path, pg: dist.ProcessGroup | None = None) -> None:
    """Writes this rank's shards under `path` (a directory shared by all ranks)."""
    dcp.save(_tensor_state(module), process_group=pg,
             storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))


def load_sharded(module: ShardedTables, path: str | Path, pg: dist.ProcessGroup | None = None) -> None:
    """Restores weights and optimizer state saved by `save_sharded` with the same sharding plan."""
    if not Path(path).is_dir():
        raise UserError(f"embeddings checkpoint not found: {path}")
    state = _tensor_state(module)
    dcp.load(state, process_group=pg, storage_reader=HuggingFaceStorageReader(str(path)))
    tables = {k.removeprefix("tables."): v for k, v in state.items() if k.startswith("tables.")}
    module.dmp.load_state_dict(tables)
    optim_state = module.optimizer.state_dict()
    for param, slots in optim_state["state"].items():
        for slot in slots:
            slots[slot] = state[f"optimizer.{param}.{slot}"]
    module.optimizer.load_state_dict(optim_state)
