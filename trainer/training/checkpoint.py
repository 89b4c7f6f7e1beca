"""Checkpoints: DeepSpeed engine + sharded tables (DCP) + loader + step + config, from every rank.

Every rank writes into a folder of its own with rank-unique file names; Ray Train merges the
ranks' folders into one checkpoint in the run's storage. One checkpoint holds:
  engine/...                 DeepSpeed `save_checkpoint` (tag "engine"; its names are rank-unique)
  tables/...                 the sharded tables + fused optimizer (DCP, safetensors layout)
  loader-rank{r}.json        the rank's loader state: the exact next batch
  dense.safetensors          rank 0: the full dense model weights, for eval and export
  state.json, config.yaml    rank 0: step, world size, run name; the resolved config
  spec/                      rank 0: the feature spec of the training features (umask/spec.py),
                             which eval, complete and export use instead of any run config
  manifest-rank{r}.json      sha256 of every file rank r wrote, and the run's name
Our code never unpickles, but DeepSpeed's engine files are pickles (its torch.load uses
weights_only=False): a checkpoint is read only after every file in every manifest matches its
checksum and the manifests name this run, so only files this run wrote are ever unpickled; and
only when it is whole: one manifest per rank of state.json's world_size.

Write, verify, publish: each rank writes its files and their manifest into a folder of its own;
Ray Train copies every rank's folder into the run's storage and publishes the checkpoint (the
one `ray.train.get_checkpoint()` and a rerun of the driver resume from) only once every rank
has reported. A rank killed while writing or copying leaves a folder with some manifests or
files missing and never published; `latest_checkpoint` (the driver's checks, eval, export) skips
such folders, and every load verifies before it reads. When the ranks load, each one hashes the
files of its own manifest only, and they agree before anyone reads (one all-reduce), so the
hashing is spread over the ranks instead of every rank reading every rank's files.

At another world size (resharding: M ranks load what N wrote) the N manifests are dealt over the
M ranks for hashing (saved rank s to rank s % M); then the tables move with DCP, the engine as
trainer/training/reshard.py says, and the loader by ShardedLoader.load_resharded_state's rule.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

from umask.spec import SPEC_DIR, file_sha256

from umask.errors import UserError

ENGINE_TAG = "engine"


class CheckpointDamaged(UserError):
    """A checkpoint that is incomplete, modified or not this run's: verification refused it
    before any of its files was read."""
RANK0_FILES = ("state.json", "config.yaml", "dense.safetensors", "spec/spec.json")  # rank 0 writes them


def save_checkpoint(folder: Path, *, rank: int, world_size: int, run_name: str, step: int,
                    engine, tables, loader_state: dict, config_yaml: str, spec_dir: Path) -> None:
    """Writes this rank's part of the checkpoint for `step` into `folder` (collective: all ranks).

    spec_dir: the feature spec folder of the training features, copied whole by rank 0."""
    from embeddings.checkpoint import save_sharded

    folder = Path(folder)
    engine.save_checkpoint(str(folder / "engine"), tag=ENGINE_TAG)
    save_sharded(tables, folder / "tables")
    dense = _full_dense_state(engine, rank)  # collective under ZeRO-3
    if dense is not None:
        save_file(dense, str(folder / "dense.safetensors"))
    _write_json(folder / f"loader-rank{rank}.json", loader_state)
    if rank == 0:
        write_state(folder, step=step, world_size=world_size, run_name=run_name,
                    tables_plan={name: dataclasses.asdict(p) for name, p in tables.placements.items()})
        (folder / "config.yaml").write_text(config_yaml)
        shutil.copytree(spec_dir, folder / SPEC_DIR)
    write_manifest(folder, rank=rank, run_name=run_name)


def write_state(folder: Path, *, step: int, world_size: int, run_name: str, tables_plan: dict | None = None) -> None:
    """state.json: the step the checkpoint holds, and the world and run that wrote it; with
    `tables_plan`, where each table was (embeddings.plan.TablePlacement as a dict), which a
    resume at another world size names when a table's optimizer state cannot move."""
    state = {"step": step, "world_size": world_size, "run": run_name}
    if tables_plan is not None:
        state["tables_plan"] = tables_plan
    _write_json(Path(folder) / "state.json", state)


def write_manifest(folder: Path, *, rank: int, run_name: str) -> None:
    """manifest-rank{rank}.json: the sha256 of every file in `folder` (this rank's own folder)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("manifest-"))
    manifest = {"run": run_name, "rank": rank,
                "files": {str(p.relative_to(folder)): file_sha256(p) for p in files}}
    _write_json(folder / f"manifest-rank{rank}.json", manifest)


def load_checkpoint(folder: Path, *, rank: int, world_size: int, run_name: str, engine, tables) -> tuple[int, dict]:
    """Verifies, then restores engine and tables; returns (step, the saved loader state to continue).

    The loader state is this rank's when the checkpoint's world size is this run's, and rank 0's
    otherwise (every rank's epoch and batch count are the same); the caller tells them apart by
    its world_size (ShardedLoader.load_state_dict or load_resharded_state). A UserError names
    whatever cannot move to this world size (trainer/training/reshard.py)."""
    from embeddings.checkpoint import load_sharded

    folder = Path(folder)
    state = _verify_together(folder, run_name, rank, world_size)
    saved_world_size = state["world_size"]
    if saved_world_size == world_size:
        load_path, _ = engine.load_checkpoint(str(folder / "engine"), tag=ENGINE_TAG)
        if load_path is None:
            raise UserError(f"{folder / 'engine'}: DeepSpeed found no engine checkpoint to load")
        load_sharded(tables, folder / "tables")
        return state["step"], json.loads((folder / f"loader-rank{rank}.json").read_text())
    from trainer.training.reshard import load_engine_resharded

    load_engine_resharded(engine, folder / "engine", ENGINE_TAG)
    load_sharded(tables, folder / "tables", saved_plan=state.get("tables_plan"))
    # the ranks stepped in lockstep: rank 0's position is every rank's epoch and batch count
    return state["step"], json.loads((folder / "loader-rank0.json").read_text())


def _verify_together(folder: Path, run_name: str, rank: int, world_size: int) -> dict:
    """verify_checkpoint of the whole structure and of the saved ranks' files dealt to this rank
    (saved rank s to rank s % world_size: its own when the world size is the checkpoint's), on
    every rank at once (collective); returns state.json. Every rank raises if any rank found a
    problem, so no rank reads a file another rank has not vouched for."""
    import torch
    import torch.distributed as dist

    error: UserError | None = None
    state: dict = {}
    try:
        saved_world_size = verify_checkpoint(folder, run_name, ranks=[])["world_size"]
        state = verify_checkpoint(folder, run_name,
                                  ranks=[s for s in range(saved_world_size) if s % world_size == rank])
    except UserError as err:
        error = CheckpointDamaged(str(err))
    failed = torch.zeros(dist.get_world_size(), dtype=torch.float32)
    failed[rank] = float(error is not None)
    dist.all_reduce(failed)
    if error is not None:
        raise error
    bad = [r for r, flag in enumerate(failed.tolist()) if flag]
    if bad:
        raise CheckpointDamaged(f"{folder}: rank {', '.join(map(str, bad))} found the checkpoint damaged "
                                "(its own error says how); refusing to load it")
    return state


def verify_checkpoint(folder: Path, run_name: str, ranks: list[int] | None = None) -> dict:
    """Checks that the checkpoint is whole, this run's and unmodified; returns state.json.

    Whole: a manifest-rank{r}.json for every rank r of state.json's world_size and no other,
    each naming its own rank, and rank 0's listing RANK0_FILES. This run's: every manifest
    names run_name. Unmodified: every file listed in the manifests of `ranks` (all ranks when
    None) is present and matches its sha256.
    """
    folder = Path(folder)
    paths = sorted(folder.glob("manifest-rank*.json"))
    if not paths:
        raise UserError(f"{folder}: not a checkpoint of this trainer (no manifest-rank*.json)")
    manifests = dict(_read_manifest(path, run_name) for path in paths)
    if 0 not in manifests:
        raise UserError(f"{folder}: manifest-rank0.json is missing, and with it the record of rank 0's "
                        f"files ({', '.join(RANK0_FILES)}); the checkpoint is incomplete")
    unlisted = [name for name in RANK0_FILES if name not in manifests[0]["files"]]
    if unlisted:
        raise UserError(f"{folder}: manifest-rank0.json does not list {', '.join(unlisted)}, which rank 0 "
                        "writes into every checkpoint; the checkpoint is incomplete")
    _check_file(folder, "state.json", manifests[0]["files"]["state.json"], "manifest-rank0.json")
    state = json.loads((folder / "state.json").read_text())
    world_size = state.get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise UserError(f"{folder / 'state.json'}: world_size must be a positive integer, got {world_size!r}")
    missing = [rank for rank in range(world_size) if rank not in manifests]
    if missing:
        raise UserError(f"{folder}: state.json says world_size={world_size}, but "
                        f"{', '.join(f'manifest-rank{r}.json' for r in missing)} "
                        f"(rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}) "
                        f"{'are' if len(missing) > 1 else 'is'} missing; the checkpoint is incomplete")
    extra = sorted(rank for rank in manifests if rank >= world_size)
    if extra:
        raise UserError(f"{folder}: manifest-rank{extra[0]}.json is from rank {extra[0]}, but state.json says "
                        f"world_size={world_size}; refusing a mix of checkpoints")
    for rank, manifest in sorted(manifests.items()):
        if ranks is not None and rank not in ranks:
            continue
        for name, digest in manifest["files"].items():
            _check_file(folder, name, digest, f"manifest-rank{rank}.json")
    return state


def is_complete(folder: Path) -> bool:
    """Whether the checkpoint in `folder` was published whole, without hashing anything: state.json,
    a manifest for every rank of its world_size, and every file they list present. A rank killed
    while writing or copying its part leaves some of them missing."""
    folder = Path(folder)
    try:
        world_size = json.loads((folder / "state.json").read_text())["world_size"]
        if not isinstance(world_size, int) or world_size < 1:
            return False
        for rank in range(world_size):
            manifest = json.loads((folder / f"manifest-rank{rank}.json").read_text())
            if not all((folder / name).is_file() for name in manifest["files"]):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def checkpoint_step(folder: Path) -> int:
    """The step in the checkpoint's state.json (-1 when unreadable)."""
    try:
        step = json.loads((Path(folder) / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    return step if isinstance(step, int) else -1


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (is_complete), newest (highest step) first.

    Every rank's part of a complete one reached the run's storage, so it is the run's state at
    its step whether or not Ray Train registered it: Ray registers a reported checkpoint when its
    controller next polls the workers, and a worker group that fails before that (a second or
    two after the report) leaves it unregistered, and Ray would resume from the one before."""
    complete = [p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and is_complete(p)]
    return sorted(complete, key=lambda p: (checkpoint_step(p), p.name), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint (complete_checkpoints); None when it has none."""
    return next(iter(complete_checkpoints(run_dir)), None)


def _read_manifest(path: Path, run_name: str) -> tuple[int, dict]:
    """manifest-rank{r}.json -> (r, the manifest), once its name, rank and run agree."""
    match = re.fullmatch(r"manifest-rank(\d+)\.json", path.name)
    if match is None:
        raise UserError(f"{path}: not a manifest name (manifest-rank<r>.json); refusing to load the checkpoint")
    rank = int(match.group(1))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: not a manifest (no 'files' mapping)")
    if manifest.get("run") != run_name:
        raise UserError(f"{path}: written by run {manifest.get('run')!r}, not {run_name!r}; refusing to load it")
    if manifest.get("rank") != rank:
        raise UserError(f"{path}: says rank {manifest.get('rank')!r}, but its name says rank {rank}; "
                        "refusing to load it")
    return rank, manifest


def _check_file(folder: Path, name: str, digest: str, manifest_name: str) -> None:
    file = folder / name
    if not file.is_file():
        raise UserError(f"{folder}: {name} is listed in {manifest_name} but missing")
    if file_sha256(file) != digest:
        raise UserError(f"{file}: checksum does not match {manifest_name}; the checkpoint was modified")


def _full_dense_state(engine, rank: int) -> dict | None:
    """The dense model's full state dict on rank 0, None elsewhere.

    Under ZeRO-3 every rank must join the gather of the partitions; only rank 0 copies.
    """
    import deepspeed

    if engine.zero_optimization_stage() == 3:
        gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    elif rank == 0:
        gather = contextlib.nullcontext()
    else:
        return None
    with gather:
        if rank != 0:
            return None
        return {k: v.detach().cpu().contiguous().clone() for k, v in engine.module.state_dict().items()}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
