"""Save and load the sharded tables and their fused optimizer state with torch.distributed.checkpoint.

Every rank calls both functions with the same path; each rank writes only its own shards
(replicated tables once) into DCP's rank-unique files. The storage is DCP's safetensors
layout (HuggingFaceStorageWriter/Reader with save_distributed): shard offsets live in each
file's JSON header, so loading parses JSON and raw tensors and never unpickles anything, which
DCP's default .metadata file would. The state saved is tensors only, weights and optimizer
accumulators; the optimizer's hyperparameters come from the config of the run that loads it.
`load_full_tables` reads the same files into one process's plain tables, for inference.
"""
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embeddings.config import EmbeddingsConfig
from embeddings.sharded import ShardedTables
from embeddings.tables import build_tables
from umask.errors import UserError


def save_sharded(module: ShardedTables, path: str | Path, pg: dist.ProcessGroup | None = None) -> None:
    """Writes this rank's shards under `path`: a new directory that all ranks can reach.

    A reused directory would keep other ranks' files from an earlier save, and loading reads
    every safetensors file in it.
    """
    dcp.save(module.state_dict(), process_group=pg,
             storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))


def load_sharded(module: ShardedTables, path: str | Path, pg: dist.ProcessGroup | None = None) -> None:
    """Restores weights and optimizer state saved by `save_sharded` with the same sharding plan."""
    if not Path(path).is_dir():
        raise UserError(f"embeddings checkpoint not found: {path}")
    state = module.state_dict()
    try:
        dcp.load(state, process_group=pg, storage_reader=HuggingFaceStorageReader(str(path)))
    except CheckpointException as err:
        raise UserError(f"embeddings checkpoint {path} does not fit these tables (were "
                        f"embeddings.* sizes or the optimizer changed?): {_first_cause(err)}") from None
    module.load_state_dict(state)


def load_full_tables(cfg: EmbeddingsConfig, path: str | Path) -> EmbeddingBagCollection:
    """The whole app and loc tables from a `save_sharded` checkpoint, in this one process.

    Needs no process group, whatever the world size that saved them: each file's header says
    which rows and columns its shards cover, and DCP copies them into full plain tensors.
    The optimizer accumulators stay on disk. The tables are meant for lookups (no grad).
    """
    if not Path(path).is_dir():
        raise UserError(f"embeddings checkpoint not found: {path}")
    tables = build_tables(cfg, "cpu")
    state = {f"tables.{name}": value.detach() for name, value in tables.state_dict().items()}
    try:
        with warnings.catch_warnings():
            # no_dist says it: DCP still warns that it found no process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    except CheckpointException as err:
        raise UserError(f"embeddings checkpoint {path} does not fit the configured tables (were "
                        f"embeddings.* sizes changed?): {_first_cause(err)}") from None
    tables.requires_grad_(False)
    return tables


def _first_cause(err: CheckpointException) -> str:
    """The first rank's underlying error, one line (DCP wraps every rank's traceback)."""
    for failure in err.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure  # (error, its frames)
        return f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
    return str(err).splitlines()[0]
