"""Resuming a checkpoint at another world size: how the dense engine's state moves.

A checkpoint written by N workers resumes on M (trainer/training/checkpoint.py). The tables move
with DCP, which places the saved shards under the new sharding plan (embeddings/checkpoint.py);
the loader moves by the rule in trainer/data/loader.py (ShardedLoader.load_resharded_state);
this module moves the DeepSpeed engine's state:
- ZeRO-0: the optimizer is whole on every rank (torch's AdamW; under bf16 DeepSpeed's
  FP16_Optimizer around it, with whole fp32 master weights) and DeepSpeed saves it in
  mp_rank_00_model_states.pt, so the engine loads the files as they are at any size.
- ZeRO-1 and ZeRO-2 (under bf16 ZeRO-1 is DeepSpeed's BF16_Optimizer, partitioned alike): the
  fp32 master weights and AdamW's moments are partitioned over the ranks, and DeepSpeed refuses
  to load partitions saved by another data-parallel degree ("Automatic adjustment of ZeRO's
  optimizer state partitioning with a new world size is not currently supported"). Its
  universal checkpoint is the field's way across: `ds_to_universal` merges the partitions into
  one file per parameter and state (fp32, exp_avg, exp_avg_sq) and the engine's universal
  loader cuts them into this world's partitions. Both are exact copies (tests/trainer/
  test_reshard.py compares every weight and moment bit for bit). Each rank converts into a
  temporary folder of its own (no file system shared between nodes is assumed): each reads
  the whole optimizer state once, which the universal load does anyway.
- ZeRO-3: the parameters are partitioned too; ds_to_universal's stage-3 path merges them with
  their optimizer state into the same per-parameter files, and the stage-3 engine's universal
  loader partitions them anew.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

from umask.errors import UserError


def load_engine_resharded(engine, engine_dir: Path, tag: str) -> None:
    """Loads the engine checkpoint `engine_dir`/`tag`, written by another number of ranks, into
    `engine` (collective: every rank calls it).

    Raises UserError when DeepSpeed's conversion or load fails, naming the folder.
    """
    if engine.zero_optimization_stage() == 0:  # the optimizer state is whole in every rank's file
        _load(engine, str(engine_dir), tag)
        return
    with tempfile.TemporaryDirectory(prefix="umask-universal-") as scratch:
        universal = Path(scratch) / tag
        to_universal(Path(engine_dir) / tag, universal)
        engine._config.load_universal_checkpoint = True  # read at load time only
        try:
            _load(engine, scratch, tag)
        finally:
            engine._config.load_universal_checkpoint = False


def to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal of the engine folder `source` into `target`, in this process.

    Our checkpoints lack the `universal_checkpoint_info` client state Megatron-DeepSpeed writes
    (a version number only, for a model without tensor or pipeline parallelism), so the converter
    injects it. Its progress lines go to a buffer, shown only if it fails.
    """
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            main(args)
    except Exception as err:  # noqa: BLE001 - DeepSpeed asserts and raises many kinds
        raise UserError(f"{source}: DeepSpeed's ds_to_universal could not convert the engine checkpoint for "
                        f"another world size ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        f"resume with the world size that wrote it. Its log:\n{log.getvalue()[-2000:]}") from None


def _load(engine, load_dir: str, tag: str) -> None:
    try:
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag)
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises RuntimeError, AssertionError, ...
        raise UserError(f"{load_dir}/{tag}: DeepSpeed could not load the engine at this world size "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if load_path is None:
        raise UserError(f"{load_dir}/{tag}: DeepSpeed found no engine checkpoint to load")
