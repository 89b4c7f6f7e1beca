"""`u-mask export`: a verified checkpoint -> an export bundle for downstream teams.

The bundle's layout and manifest are umask/bundle_format.py's; downstream teams read it with
umask/bundle.py (`pip install ./umask`). Export writes, from a checkpoint that passed
verify_checkpoint:
- spec/: the checkpoint's feature spec, copied byte for byte;
- dense/: dense.safetensors widened to float32, split into files of at most max_shard_bytes.
  dense.safetensors is the whole dense model under every ZeRO stage: rank 0 gathers the
  partitions when the checkpoint is written (trainer/training/checkpoint.py), so no DeepSpeed
  file is unpickled here. Under bf16/fp16 training these are the half-precision weights the
  engine computed with (widening is exact), not the fp32 optimizer masters;
- tables/: each table streamed from the DCP shards by embeddings.export (one block of rows in
  memory, never a whole table);
- ids/: the raw app and loc ids of the training examples (split=train of the features the
  checkpoint's config names, or --features) with their rows; memory grows with the number of
  distinct ids, not of examples;
- program/complete.pt2: torch.export of UMask.complete_from_noise (the model's sample_steps,
  the batch dimension dynamic), built from the float32 weights just written, without example
  inputs (they would be a pickle) or source paths (so the bytes do not depend on where the
  code is installed);
- users.parquet with --users: the training users' vectors from their latest training window
  (umask.user_embeddings rows, computed_at = the export's created_at);
- manifest.json last, so a folder without it is an interrupted export.

Deterministic: exporting one checkpoint twice gives the same bytes in every file except
manifest.json's created_at and, with --users, users.parquet's computed_at column (and so its
sha256 in the manifest). bundle_version hashes every file but users.parquet.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from trainer.config import RunConfig
from trainer.data.loader import discover, read_row_group
from trainer.inference.loading import open_checkpoint
from umask.bundle_format import (DENSE_DIR, FORMAT, MANIFEST, PROGRAM, PROGRAM_INPUTS, SEEN_IDS, SEEN_SCHEMA, TABLES, USERS, bundle_version, file_entry, pickled_entries)
from umask.errors import UserError
from umask.model import UMask
from umask.slots import ExampleRows
from umask.spec import SPEC_DIR, FeatureSpec, load_spec, table_rows

DEFAULT_SHARD_BYTES = 2 << 30  # dense safetensors files of at most 2 GiB, as hubs split them
# the contract the reader implements: its document and the revision the bundle was made under
DATA_CONTRACT = "docs/data-contract.md, revision 2026-11 (Spark directories, INT96, optional loc_id, plausible ts)"


class CompletionProgram(torch.nn.Module):
    """UMask.complete_from_noise with fixed DDIM steps, as a module torch.export can trace:
    inputs umask.bundle_format.PROGRAM_INPUTS, output the completed dense [B,T,F]."""

    def __init__(self, model: UMask):
        super().__init__()
        self.model = model
        self.timesteps = model.diffusion.ddim_timesteps(model.cfg.diffusion.sample_steps)

    def forward(self, dense, evidence, time_of_week, slot_sparse, noise):
        return self.model.complete_from_noise(dense, evidence, time_of_week, slot_sparse, noise, self.timesteps)


def export_bundle(checkpoint: str | Path, out: str | Path, *, eval_report: str | Path | None = None,
                  features: str | Path | None = None, users: bool = False,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """What `u-mask export` does: writes the bundle of `checkpoint` (a checkpoint or run folder,
    its latest checkpoint) into `out` and returns the manifest (module docstring).

    eval_report: a `u-mask eval` report.json of this checkpoint, whose headline metrics go into
    the manifest. features: the training features (default: data.features of the checkpoint's
    config), for the seen ids and --users; they must have the checkpoint's spec digest.
    Errors are UserErrors naming the file: a checkpoint that fails verification, features of
    another spec, an eval report of another step, an `out` holding other files.
    """
    created_at = datetime.now(timezone.utc).replace(microsecond=0)
    folder, state, cfg, spec = open_checkpoint(checkpoint)
    if cfg.model.backbone != "dit":
        raise UserError(f"{folder}: a model.backbone={cfg.model.backbone} run is the evaluation's "
                        "learned baseline; only U-MASK (backbone dit) is exported")
    features = Path(features if features is not None else cfg.data.features)
    _check_features(features, spec)
    headline = _eval_headline(Path(eval_report), int(state["step"])) if eval_report is not None else None
    out = _prepare_output(Path(out))

    shutil.copytree(folder / SPEC_DIR, out / SPEC_DIR)
    dense_files = _write_dense(folder / "dense.safetensors", out, max_shard_bytes)
    from embeddings.export import write_table_parquet

    for name, table in cfg.embeddings.tables().items():
        write_table_parquet(folder / "tables", name, table.num_embeddings, table.dim, out / TABLES[name])
    _write_seen_ids(features, cfg, out)
    _write_program(cfg, spec, out, dense_files)

    files = {str(p.relative_to(out)): file_entry(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT, "created_at": created_at.isoformat(), "bundle_version": bundle_version(files),
        "run": state.get("run"), "step": int(state["step"]), "checkpoint": folder.name,
        "data_contract": DATA_CONTRACT,
        "model": dataclasses.asdict(cfg.model),
        "embeddings": {"pooling": cfg.embeddings.pooling,
                       "tables": {name: {"rows": t.num_embeddings, "dim": t.dim}
                                  for name, t in cfg.embeddings.tables().items()}},
        "feature_spec": spec.to_json(),
        "plausible_range": list(cfg.data.plausible_range()),
        "dense": {"files": dense_files, "dtype": "float32"},
        "program": {"file": PROGRAM, "inputs": list(PROGRAM_INPUTS), "dynamic": {"batch": "dim 0 of every input"},
                    "sample_steps": cfg.model.diffusion.sample_steps, "torch": torch.__version__},
        "eval": headline,
        "users": None,
        "files": files,
    }
    _write_manifest(out, manifest)
    if users:
        manifest = _add_users(out, features, manifest, int(created_at.timestamp()))
    return manifest


def _prepare_output(out: Path) -> Path:
    """Empties an earlier bundle (or interrupted export) in `out`; refuses a folder of other files."""
    if out.exists() and any(out.iterdir()):
        ours = {MANIFEST, SPEC_DIR, DENSE_DIR, USERS, *(p.split("/")[0] for p in (*TABLES.values(),
                                                                                 *SEEN_IDS.values(), PROGRAM))}
        others = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if others:
            raise UserError(f"{out}: holds {others[0]}, which is not part of an export bundle; "
                            "choose an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_features(features: Path, spec: FeatureSpec) -> None:
    if not (features / SPEC_DIR).is_dir():
        raise UserError(f"{features}: no training features here (no spec/); export reads the ids seen in "
                        "training from them: pass --features with the folder training read")
    digest = load_spec(features / SPEC_DIR).digest
    if digest != spec.digest:
        raise UserError(f"{features}: features of another feature spec (digest {digest[:12]}) than the "
                        f"checkpoint's ({spec.digest[:12]}); pass --features with the folder training read")


def _eval_headline(path: Path, step: int) -> dict:
    """The model's metrics over all users per task, from a `u-mask eval` report.json of this step."""
    from trainer.inference.evaluate import MODEL

    try:
        report = json.loads(path.read_text())
        tasks = {task: methods[MODEL]["all"] for task, methods in report["tasks"].items()}
        split, report_step = report["settings"]["split"], report["step"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a `u-mask eval` report.json ({err!r})") from None
    if report_step != step:
        raise UserError(f"{path}: evaluates step {report_step}, but the exported checkpoint is step {step}")
    return {"report": path.name, "split": split, "headline_metric": report.get("headline_metric"),
            "tasks": tasks}


def _write_dense(source: Path, out: Path, max_shard_bytes: int) -> list[str]:
    """dense.safetensors as float32 files of at most max_shard_bytes each (a tensor larger than
    that gets a file of its own), keys in sorted order; returns their bundle paths."""
    weights = {key: value.float().contiguous() for key, value in sorted(load_file(str(source)).items())}
    groups, size = [[]], 0
    for key, value in weights.items():
        nbytes = value.numel() * 4
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    names = [f"{DENSE_DIR}/model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    (out / DENSE_DIR).mkdir()
    for name, keys in zip(names, groups):
        save_file({key: weights[key] for key in keys}, str(out / name), metadata={"format": "pt"})
        # safetensors creates its files 0600; a bundle is read by other teams, like its Parquet files
        (out / name).chmod(0o644)
    return names


def _write_seen_ids(features: Path, cfg: RunConfig, out: Path) -> None:
    """ids/<table>.parquet: the distinct raw ids of split=train's bags, ascending, with their rows."""
    distinct = {"app": [], "loc": []}
    for file in discover(features, ("train",)):
        parquet = pq.ParquetFile(file.path)
        for group in range(parquet.metadata.num_row_groups):
            bags = parquet.read_row_group(group, columns=["app_ids", "loc_ids"])
            for name, column in (("app", "app_ids"), ("loc", "loc_ids")):
                distinct[name].append(np.unique(bags.column(column).combine_chunks().flatten().to_numpy()))
    for name, parts in distinct.items():
        ids = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
        rows = table_rows(ids, cfg.embeddings.tables()[name].num_embeddings)
        (out / SEEN_IDS[name]).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"raw_id": ids.astype(np.int64), "row": rows}, schema=SEEN_SCHEMA),
                       out / SEEN_IDS[name])


def _write_program(cfg: RunConfig, spec: FeatureSpec, out: Path, dense_files: list[str]) -> None:
    """program/complete.pt2 of the model rebuilt from the bundle's own dense files."""
    from embeddings.tables import pooled_dim

    model = UMask(cfg.model, spec, sparse_dim=pooled_dim(cfg.embeddings))
    weights = {}
    for name in dense_files:
        weights.update(load_file(str(out / name)))
    model.load_state_dict(weights, strict=True)
    model.eval().requires_grad_(False)
    slots, channels = spec.slots, spec.layout.num_channels
    generator = torch.Generator().manual_seed(0)
    batch = 2  # not 1: torch.export would specialize the batch dimension to 1
    example = (torch.rand(batch, slots, channels, generator=generator),
               torch.rand(batch, slots, generator=generator) < 0.5,
               torch.arange(slots).repeat(batch, 1) % spec.slots_per_week,
               torch.randn(batch, slots, pooled_dim(cfg.embeddings), generator=generator),
               torch.randn(batch, slots, channels, generator=generator))
    dim = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(CompletionProgram(model), example,
                                      dynamic_shapes=tuple({0: dim} for _ in example), strict=False)
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)  # source paths of this machine
    program._example_inputs = None  # torch.export.save would pickle them
    path = out / PROGRAM
    path.parent.mkdir(parents=True)
    torch.export.save(program, str(path))
    pickles = pickled_entries(path)
    if pickles:
        raise RuntimeError(f"{path}: torch.export wrote a pickle ({pickles[0]}); the bundle must hold none")


def _add_users(out: Path, features: Path, manifest: dict, computed_at: int) -> dict:
    """users.parquet: the training users' vectors; the manifest rewritten to list it."""
    from umask.bundle import Bundle
    from umask.user_embeddings import embed_rows_table, embeddings_schema

    bundle = Bundle(out, verify=False)  # written moments ago by this process
    spec = bundle.spec
    with pq.ParquetWriter(out / USERS, embeddings_schema(bundle.model.cfg.user_dim)) as writer:
        for file in discover(features, ("train",)):
            carry = None  # the file's last user so far: its later windows may be in the next group
            for group in range(file.metadata.num_row_groups):
                rows = read_row_group(file, group, spec.slots, spec.layout.num_channels)
                rows = rows if carry is None else ExampleRows.concat([carry, rows])
                last = np.flatnonzero(np.append(rows.user_id[1:] != rows.user_id[:-1], True))
                if len(last) > 1:
                    writer.write_table(embed_rows_table(bundle, rows.take(last[:-1]), computed_at=computed_at))
                carry = rows.take(last[-1:])
            if carry is not None:
                writer.write_table(embed_rows_table(bundle, carry, computed_at=computed_at))
    manifest = {**manifest, "users": {"file": USERS, "split": "train", "computed_at": computed_at},
                "files": {**manifest["files"], USERS: file_entry(out / USERS)}}
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / MANIFEST)
