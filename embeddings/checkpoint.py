"""Save and load the sharded tables and their fused optimizer state with torch.distributed.checkpoint.

Every rank calls both functions with the same path; each rank writes only its own shards
(replicated tables once) into DCP's rank-unique files. The storage is DCP's safetensors
layout (HuggingFaceStorageWriter/Reader with save_distributed): shard offsets live in each
file's JSON header, so loading parses JSON and raw tensors and never unpickles anything, which
DCP's default .metadata file would. The state saved is tensors only, weights and optimizer
accumulators; the optimizer's hyperparameters come from the config of the run that loads it.
`load_full_tables` reads the same files into one process's plain tables, for inference.
"""
import dataclasses
import json
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._hf_utils import (CUSTOM_METADATA_KEY, DCP_VERSION_KEY, FORMAT_KEY,
                                                    FORMAT_VALUE, HF_DCP_VERSION, SUFFIX, _gen_file_name)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

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
             storage_writer=StreamingSafetensorsWriter(str(path), save_distributed=True))


class StreamingSafetensorsWriter(HuggingFaceStorageWriter):
    """DCP's safetensors layout, each file written by safetensors' save_file from the tensors' memory.

    torch 2.13's HuggingFaceStorageWriter builds each whole file as bytes first
    (safetensors.torch.save) and then writes it: two extra copies of a rank's shard, so a
    2.56 GB shard (10^7 x 64 float32) peaked at 7.7 GB while saving (docs/embeddings.md).
    save_file streams from the tensors' own storage. The files and their headers (the DCP
    offsets of each shard) are the ones HuggingFaceStorageWriter writes, so
    HuggingFaceStorageReader reads them unchanged.
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        storage_plan = plan.storage_data.get("fqn_to_index_mapping") if plan.storage_data else None
        shard_index = plan.storage_data.get("shard_index") if plan.storage_data else None
        highest_index = max(storage_plan.values()) if storage_plan else 1
        results = []
        for file_index, all_items in self._split_by_storage_plan(storage_plan, plan.items).items():
            for file_name, items in _one_chunk_per_name(_gen_file_name(file_index, highest_index, shard_index),
                                                        all_items):
                results += self._write_file(file_name, items, planner)
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def _write_file(self, file_name: str, items: list, planner: SavePlanner) -> list[WriteResult]:
        """One safetensors file of `items` (at most one chunk per name: the header keys by name)."""
        tensors, offsets = {}, {}
        for item in items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"{item.index.fqn}: the tables' state is tensors only, not bytes")
            # a CPU tensor's shard is already contiguous: no copy (an accelerator's comes to the host)
            tensors[item.index.fqn] = planner.resolve_data(item).detach().cpu().contiguous()
            offsets[item.index.fqn] = {"saved_offsets": list(item.tensor_data.chunk.offsets)}
        save_file(tensors, str(self.fs.concat_path(self.path, file_name)), metadata={
            CUSTOM_METADATA_KEY: json.dumps(offsets), DCP_VERSION_KEY: str(HF_DCP_VERSION),
            FORMAT_KEY: FORMAT_VALUE})
        return [WriteResult(index=item.index, size_in_bytes=tensors[item.index.fqn].nbytes,
                            storage_data=_StorageInfo(file_name, 0, tensors[item.index.fqn].nbytes))
                for item in items]


def _one_chunk_per_name(file_name: str, items: list) -> list[tuple[str, list]]:
    """`items` as files holding at most one chunk of each tensor name: `file_name`, then
    `<file_name>-1.safetensors`, ... for a rank's second, third... chunk of the same tensor.

    A safetensors header keys tensors by name, so torch's HuggingFaceStorageWriter kept only the
    last of a rank's chunks of one tensor: one worker holding both column shards of a column-wise
    table (what resharding to fewer workers plans) saved half of it. HuggingFaceStorageReader
    reads every .safetensors file in the folder, each header saying its chunk's offsets.
    """
    layers: list[list] = []
    for item in items:
        layer = next((chunks for chunks in layers if all(c.index.fqn != item.index.fqn for c in chunks)), None)
        if layer is None:
            layers.append(layer := [])
        layer.append(item)
    stem = file_name.removesuffix(SUFFIX)
    return [(file_name if k == 0 else f"{stem}-{k}{SUFFIX}", layer) for k, layer in enumerate(layers)]


def load_sharded(module: ShardedTables, path: str | Path, pg: dist.ProcessGroup | None = None,
                 saved_plan: dict | None = None) -> None:
    """Restores weights and optimizer state saved by `save_sharded`, under any sharding plan and
    world size: DCP reads each saved shard's rows and columns (from the files' headers) into
    whichever shards of this plan cover them, so every row and accumulator is copied as saved.

    What DCP cannot move is an optimizer state whose layout is the plan's: a replicated
    (data_parallel) table keeps torch's Adagrad state (`sum`, `step`), a sharded one FBGEMM's
    `momentum1`, and row-wise Adagrad on a column-wise table keeps one accumulator per row and
    column shard. Such a change is a UserError naming the table, its layouts and, with
    `saved_plan` (table -> embeddings.plan.TablePlacement as a dict, from the checkpoint's
    state.json), where it was; raised on every rank alike, before anything is read.
    """
    if not Path(path).is_dir():
        raise UserError(f"embeddings checkpoint not found: {path}")
    state = module.state_dict()
    reader = HuggingFaceStorageReader(str(path))
    # a rank holding no shard of a table has no optimizer entry for it: the plan's are all ranks'
    held = [None] * dist.get_world_size(pg)
    dist.all_gather_object(held, {key: _shape(value) for key, value in state.items()}, group=pg)
    planned = {key: shape for rank_held in held for key, shape in rank_held.items()}
    saved = {key: _shape(value) for key, value in reader.read_metadata().state_dict_metadata.items()}
    resized = [f"{key} saved {list(shape)}, configured now {list(planned[key])}" for key, shape in saved.items()
               if not key.startswith("optimizer.") and key in planned and planned[key] != shape]
    if resized:
        raise UserError(f"embeddings checkpoint {path} does not fit these tables (were embeddings.* "
                        f"sizes changed?): {'; '.join(resized)}")
    problems = _layout_problems(saved, planned, saved_plan,
                                {name: dataclasses.asdict(p) for name, p in module.placements.items()})
    if problems:
        raise UserError(f"embeddings checkpoint {path}: the tables' optimizer state cannot move to this "
                        f"sharding plan: {'; '.join(problems)}")
    try:
        dcp.load(state, process_group=pg, storage_reader=reader)
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


def _layout_problems(saved: dict, planned: dict, saved_plan: dict | None, plan: dict) -> list[str]:
    """Per table whose optimizer entries (names and global shapes, fqn -> shape) differ between
    the checkpoint (`saved`) and this plan on all ranks (`planned`): one line saying what each
    holds, where it was and is, and which config key keeps the layout."""
    def layout(shapes: dict, table: str) -> dict[str, tuple[int, ...]]:
        return {key.rsplit(".", 1)[-1]: shape for key, shape in shapes.items()
                if key.startswith("optimizer.") and key.split(".")[2] == table}

    def shown(slots: dict) -> str:
        return ", ".join(f"{k} {list(v)}" for k, v in sorted(slots.items())) or "nothing"

    def where(placement: dict | None) -> str:
        if not placement:
            return ""
        shards = f", {len(placement['shard_dims'])} column shards" if len(placement["shard_dims"]) > 1 else ""
        return f" ({placement['sharding_type']} on ranks {tuple(placement['ranks'])}{shards})"

    out = []
    for table, placement in plan.items():
        was, now = layout(saved, table), layout(planned, table)
        if was != now:
            kind = (saved_plan or {}).get(table, {}).get("sharding_type")
            keep = (f"; set embeddings.{table}.sharding_types=[{kind}] (and its column_shard_dim) to keep it"
                    if kind else "")
            out.append(f"table '{table}' saved {shown(was)}{where((saved_plan or {}).get(table))}, planned "
                       f"now as {shown(now)}{where(placement)}{keep}")
    return out


def _shape(value) -> tuple[int, ...]:
    """The global shape of a tensor, a ShardedTensor (size() methods) or DCP metadata (a size field)."""
    return tuple(value.size() if callable(value.size) else value.size)


def _first_cause(err: CheckpointException) -> str:
    """The first rank's underlying error, one line (DCP wraps every rank's traceback)."""
    for failure in err.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure  # (error, its frames)
        return f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
    return str(err).splitlines()[0]
