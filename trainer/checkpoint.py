"""Checkpoints: DeepSpeed engine + sharded tables (DCP) + loader + step + config, from every rank.

Every rank writes into a folder of its own with rank-unique file names; Ray Train merges the
ranks' folders into one checkpoint in the run's storage. One checkpoint holds:
  engine/...                 DeepSpeed `save_checkpoint` (tag "engine"; its names are rank-unique)
  tables/...                 the sharded tables + fused optimizer (DCP, safetensors layout)
  loader-rank{r}.json        the rank's loader state: the exact next batch
  dense.safetensors          rank 0: the full dense model weights, for eval and export
  state.json, config.yaml    rank 0: step, world size, run name; the resolved config
  manifest-rank{r}.json      sha256 of every file rank r wrote, and the run's name
Our code never unpickles, but DeepSpeed's engine files are pickles (its torch.load uses
weights_only=False): a checkpoint is read only after every file in every manifest matches its
checksum and the manifests name this run, so only files this run wrote are ever unpickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from safetensors.torch import save_file

from umask.errors import UserError

ENGINE_TAG = "engine"


def save_checkpoint(folder: Path, *, rank: int, world_size: int, run_name: str, step: int,
                    engine, tables, loader_state: dict, config_yaml: str) -> None:
    """Writes this rank's part of the checkpoint for `step` into `folder` (collective: all ranks)."""
    from embeddings.checkpoint import save_sharded

    folder = Path(folder)
    engine.save_checkpoint(str(folder / "engine"), tag=ENGINE_TAG)
    save_sharded(tables, folder / "tables")
    dense = _full_dense_state(engine, rank)  # collective under ZeRO-3
    if dense is not None:
        save_file(dense, str(folder / "dense.safetensors"))
    _write_json(folder / f"loader-rank{rank}.json", loader_state)
    if rank == 0:
        write_state(folder, step=step, world_size=world_size, run_name=run_name)
        (folder / "config.yaml").write_text(config_yaml)
    write_manifest(folder, rank=rank, run_name=run_name)


def write_state(folder: Path, *, step: int, world_size: int, run_name: str) -> None:
    """state.json: the step the checkpoint holds, and the world and run that wrote it."""
    _write_json(Path(folder) / "state.json", {"step": step, "world_size": world_size, "run": run_name})


def write_manifest(folder: Path, *, rank: int, run_name: str) -> None:
    """manifest-rank{rank}.json: the sha256 of every file in `folder` (this rank's own folder)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("manifest-"))
    manifest = {"run": run_name, "rank": rank,
                "files": {str(p.relative_to(folder)): _sha256(p) for p in files}}
    _write_json(folder / f"manifest-rank{rank}.json", manifest)


def load_checkpoint(folder: Path, *, rank: int, world_size: int, run_name: str, engine, tables) -> tuple[int, dict]:
    """Verifies, then restores engine, tables and loader; returns (step, this rank's loader state)."""
    from embeddings.checkpoint import load_sharded

    folder = Path(folder)
    state = verify_checkpoint(folder, run_name)
    if state["world_size"] != world_size:
        raise UserError(
            f"{folder}: written by {state['world_size']} workers, this run has {world_size}; "
            "resume with ray.num_workers=" f"{state['world_size']} (resharding is not supported yet)")
    load_path, _ = engine.load_checkpoint(str(folder / "engine"), tag=ENGINE_TAG)
    if load_path is None:
        raise UserError(f"{folder / 'engine'}: DeepSpeed found no engine checkpoint to load")
    load_sharded(tables, folder / "tables")
    loader_state = json.loads((folder / f"loader-rank{rank}.json").read_text())
    return state["step"], loader_state


def verify_checkpoint(folder: Path, run_name: str) -> dict:
    """Checks every rank's manifest (run name, every file's sha256); returns state.json."""
    folder = Path(folder)
    manifests = sorted(folder.glob("manifest-rank*.json"))
    if not manifests:
        raise UserError(f"{folder}: not a checkpoint of this trainer (no manifest-rank*.json)")
    for path in manifests:
        manifest = json.loads(path.read_text())
        if manifest.get("run") != run_name:
            raise UserError(f"{path}: written by run {manifest.get('run')!r}, not {run_name!r}; refusing to load it")
        for name, digest in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise UserError(f"{folder}: {name} is listed in {path.name} but missing")
            if _sha256(file) != digest:
                raise UserError(f"{file}: checksum does not match {path.name}; the checkpoint was modified")
    return json.loads((folder / "state.json").read_text())


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
