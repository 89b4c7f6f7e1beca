"""Every ZeRO stage and precision, for real: train, checkpoint, resume exactly, skip a NaN step.

Two spawned gloo ranks run the real Trainer (trainer/training/loop.py) with a real DeepSpeed
engine and TorchRec-sharded tables, through the real checkpoint code (Trainer.write_checkpoint
and Trainer.load_checkpoint: what save and restore do around Ray Train), once per (ZeRO stage,
precision) the config accepts on CPU, as DeepSpeed's own checkpoint tests do per stage. For each:
- run A trains 2 steps, writes a checkpoint, trains 2 more;
- run B, a new Trainer, loads that checkpoint and trains the same 2 steps: the losses and the
  final weights (dense and every rank's table shards) must equal A's exactly. The tolerance
  is zero: same world size, same machine, same thread count, and every restored tensor is
  copied bit for bit, so the resumed steps repeat the same floating-point operations;
- B then gets a batch whose dense values are NaN on rank 1 (step 5): the step must be skipped
  on both ranks with no weight changed, dense or sparse, and step 6 must train normally.
fp16 is refused on CPU workers (DeepSpeed's CPU engine lacks it here), so its GPU path gets a
CPU twin: the same run with DeepSpeed's fp16 check lifted. Its first steps overflow at the
initial loss scale (2^16); those loss-scale skips must be counted and move no weight.
All combinations share two processes (about 10 s of imports); a Trainer takes 1-3 s to build.
"""
import dataclasses
import hashlib
import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

from gloo_ranks import run_ranks, values

pytestmark = pytest.mark.slow

CPU_COMBOS = [(stage, precision) for precision in ("fp32", "bf16") for stage in (0, 1, 2, 3)]
FP16_TWIN = [(2, "fp16"), (3, "fp16")]  # fp16 needs ZeRO (trainer/config.py)
NAN_STEP = 5
# (a combo's checkpoint, the ZeRO stage and dense lr it is resumed under)
CROSS = [("zero1-fp32", 2, 0.003), ("zero2-fp32", 1, 0.003), ("zero0-fp32", 0, 0.001)]


def _weights(trainer, tensors: bool = False) -> dict[str, object]:
    """sha256 per dense tensor and per local table shard (collective under ZeRO-3), whether every
    value is finite, and with `tensors` the tensors themselves."""
    import deepspeed
    import torch

    engine = trainer.engine
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
              if engine.zero_optimization_stage() == 3 else nullcontext())
    with gather:
        dense = {f"dense.{k}": v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    tables = {}
    for key, value in trainer.tables.state_dict().items():
        shards = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
        for i, shard in enumerate(shards):
            tables[f"{key}#{i}"] = shard.detach().float().clone()
    keep, tensors = tensors, {**dense, **tables}
    out = {"digest": {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in tensors.items()},
           "finite": all(bool(torch.isfinite(v).all()) for v in tensors.values())}
    if keep:  # numpy: torch tensors would cross the result queue as shared memory of the exiting process
        out["tensors"] = {k: v.numpy() for k, v in tensors.items()}
    return out


def _local_trainer(cfg, run_dir: Path, nan_at: int | None = None):
    import trainer.training.loop as loop

    class Local(loop.Trainer):
        """The real Trainer, without Ray Train around save and restore."""

        def restore(self) -> None:
            pass

        def save(self, metrics) -> None:
            pass

        def next_batch(self):
            batch = super().next_batch()
            if nan_at is not None and self.step + 1 == nan_at and self.rank == 1:
                batch.dense = batch.dense.clone()
                batch.dense[0] = float("nan")  # a corrupt example: its loss is NaN
            return batch

    return Local(cfg, run_dir)


def _write_merged(trainer, folder: Path) -> None:
    """Trainer.write_checkpoint into a folder of this rank's own, then copied into `folder`
    beside the other ranks' files: what Ray Train does with the folders the ranks report."""
    import torch.distributed as dist

    own = folder.parent / f"{folder.name}-rank{trainer.rank}"
    trainer.write_checkpoint(own)
    shutil.copytree(own, folder, dirs_exist_ok=True)
    dist.barrier()


def _combos(rank: int, cfg, root: str, combos, fp16_scale_power: int | None, cross=()) -> dict:
    import torch.distributed as dist

    import trainer.training.loop as loop

    if fp16_scale_power is not None:  # the CPU twin of the GPU fp16 path
        from deepspeed.accelerator import get_accelerator

        type(get_accelerator()).is_fp16_supported = lambda self: True
        plain = loop.deepspeed_config

        def high_scale(*args, **kwargs):
            out = plain(*args, **kwargs)
            out["fp16"]["initial_scale_power"] = fp16_scale_power
            return out
        loop.deepspeed_config = high_scale

    results = {}
    for stage, precision in combos:
        name = f"zero{stage}-{precision}"
        combo_cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(
            cfg.deepspeed, zero_stage=stage, precision=precision))
        run_dir, folder = Path(root) / name, Path(root) / name / "checkpoint"
        straight = _local_trainer(combo_cfg, run_dir)
        first, first_weights = [], [_weights(straight)]
        for _ in range(2):
            first.append(straight.train_step())
            first_weights.append(_weights(straight))
        _write_merged(straight, folder)
        then = [straight.train_step() for _ in range(2)]
        straight_weights = _weights(straight, tensors=True)
        straight_tensors = straight_weights.pop("tensors")
        dist.barrier()

        resumed = _local_trainer(combo_cfg, run_dir, nan_at=NAN_STEP)
        resumed.load_checkpoint(folder)
        resumed_steps = [resumed.train_step() for _ in range(2)]
        resumed_weights = _weights(resumed)
        nan_step = resumed.train_step()
        after_nan = _weights(resumed)
        next_step = resumed.train_step()
        results[name] = {
            "step": resumed.step,
            "first": [(float(m.values["loss"]), m.skipped) for m in first],
            "first_weights": first_weights,
            "straight": [(float(m.values["loss"]), m.skipped) for m in then],
            "resumed": [(float(m.values["loss"]), m.skipped) for m in resumed_steps],
            "straight_weights": straight_weights, "resumed_weights": resumed_weights,
            "straight_tensors": straight_tensors if name in {source for source, *_ in cross} else None,
            "nan_skipped": nan_step.skipped, "after_nan": after_nan,
            "next": (float(next_step.values["loss"]), next_step.skipped),
            "lr": [group["lr"] for group in resumed.engine.optimizer.param_groups],
        }
        dist.barrier()
    for source, stage, lr in cross:  # resume another combo's checkpoint under a changed config
        changed = dataclasses.replace(cfg, deepspeed=dataclasses.replace(
            cfg.deepspeed, zero_stage=stage, precision=source.split("-")[1], lr=lr))
        other = _local_trainer(changed, Path(root) / f"{source}-as-zero{stage}")
        other.load_checkpoint(Path(root) / source / "checkpoint")
        steps = [other.train_step() for _ in range(2)]
        weights = _weights(other, tensors=True)
        results[f"{source}->zero{stage}@{lr}"] = {
            "resumed": [(float(m.values["loss"]), m.skipped) for m in steps],
            "resumed_tensors": weights.pop("tensors"), "resumed_weights": weights,
            "lr": [group["lr"] for group in other.engine.optimizer.param_groups]}
        dist.barrier()
    if cross:
        results["restore"] = _restore_passes_over_damage(rank, cfg, Path(root))
    return results


def _restore_passes_over_damage(rank: int, cfg, root: Path) -> dict:
    """Trainer.restore on a run folder whose newest checkpoint is damaged (its state.json no
    longer matches the manifest), then on one whose only checkpoint is."""
    import json

    import torch.distributed as dist

    from umask.errors import UserError

    run, lone = root / "restore" / "run", root / "restore" / "lone"
    if rank == 0:
        shutil.copytree(root / "zero0-fp32" / "checkpoint", run / "checkpoint_a")
        for target in (run / "checkpoint_b", lone / "checkpoint_b"):
            shutil.copytree(root / "zero0-fp32" / "checkpoint", target)
            state = json.loads((target / "state.json").read_text())
            (target / "state.json").write_text(json.dumps({**state, "step": 9}))
    dist.barrier()
    trainer = _local_trainer(dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=0)), run)
    type(trainer).__bases__[0].restore(trainer)  # the real restore, which the test subclass stubs
    out = {"step": trainer.step}
    trainer.run_dir = lone
    try:
        type(trainer).__bases__[0].restore(trainer)
    except UserError as err:
        out["lone"] = str(err)
    return out


def _per_rank_verification(rank: int, folder: str) -> tuple:
    """load_checkpoint of a checkpoint whose rank-1 file is damaged: both ranks must refuse, each
    having hashed only its own files."""
    import trainer.training.checkpoint as checkpoint

    hashed: list[tuple[str, str]] = []
    plain = checkpoint._check_file

    def counting(folder_, name, digest, manifest_name):
        hashed.append((manifest_name, name))
        return plain(folder_, name, digest, manifest_name)

    checkpoint._check_file = counting
    try:
        checkpoint.load_checkpoint(Path(folder), rank=rank, world_size=2, run_name="engines",
                                   engine=None, tables=None)
    except Exception as err:  # noqa: BLE001 - the test wants the message
        return type(err).__name__, str(err), sorted(set(hashed))
    return None, None, sorted(set(hashed))


def _own_files(folder: Path, rank: int) -> set[tuple[str, str]]:
    import json

    manifest = json.loads((folder / f"manifest-rank{rank}.json").read_text())
    return {(f"manifest-rank{rank}.json", name) for name in manifest["files"]}


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, tiny_dataset):
    from trainer.config import load_config

    root = tmp_path_factory.mktemp("engines")
    cfg = load_config([str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")], [
        f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
        "ray.name=engines", "deepspeed.lr=0.003"])
    cpu = values(run_ranks(_combos, 2, cfg, str(root / "cpu"), CPU_COMBOS, None, CROSS))
    twin = values(run_ranks(_combos, 2, cfg, str(root / "twin"), FP16_TWIN, 16))
    return {rank: {**cpu[rank], **twin[rank]} for rank in cpu}, root


@pytest.mark.parametrize("stage,precision", CPU_COMBOS + FP16_TWIN,
                         ids=[f"zero{s}-{p}" for s, p in CPU_COMBOS + FP16_TWIN])
def test_stage_trains_checkpoints_and_resumes_exactly(engine_runs, stage, precision):
    runs, _ = engine_runs
    for rank in (0, 1):
        run = runs[rank][f"zero{stage}-{precision}"]
        assert run["resumed"] == run["straight"], rank  # losses, bit for bit, and skip reasons
        assert run["resumed_weights"] == run["straight_weights"], rank
        assert run["resumed_weights"]["finite"]
        assert all(math.isfinite(loss) for loss, skipped in run["straight"] if skipped is None)
        assert run["lr"] and all(lr == 0.003 for lr in run["lr"])  # the config's, after the load


@pytest.mark.parametrize("stage,precision", CPU_COMBOS + FP16_TWIN,
                         ids=[f"zero{s}-{p}" for s, p in CPU_COMBOS + FP16_TWIN])
def test_a_nan_batch_skips_the_step_on_every_rank_and_moves_no_weight(engine_runs, stage, precision):
    runs, _ = engine_runs
    for rank in (0, 1):
        run = runs[rank][f"zero{stage}-{precision}"]
        assert run["nan_skipped"] == "nonfinite", rank  # rank 0's batch was fine: it skips too
        assert run["after_nan"] == run["resumed_weights"], rank  # dense and table shards unchanged
        assert run["after_nan"]["finite"]
        loss, skipped = run["next"]
        assert skipped in ((None, "loss_scale") if precision == "fp16" else (None,)), rank
        assert skipped is not None or math.isfinite(loss), rank


@pytest.mark.parametrize("stage,precision", CPU_COMBOS + FP16_TWIN,
                         ids=[f"zero{s}-{p}" for s, p in CPU_COMBOS + FP16_TWIN])
def test_skipped_steps_move_no_weight_and_others_do(engine_runs, stage, precision):
    runs, _ = engine_runs
    for rank in (0, 1):
        run = runs[rank][f"zero{stage}-{precision}"]
        for step, (_, skipped) in enumerate(run["first"], start=1):
            before, after = run["first_weights"][step - 1], run["first_weights"][step]
            if skipped is None:
                assert after["digest"] != before["digest"], (rank, step)
            else:  # neither the dense model nor any table shard nor their optimizer state moved
                assert after == before, (rank, step)


@pytest.mark.parametrize("stage", [s for s, _ in FP16_TWIN])
def test_fp16_loss_scale_skips_are_counted(engine_runs, stage):
    runs, _ = engine_runs
    for rank in (0, 1):
        run = runs[rank][f"zero{stage}-fp16"]
        # the initial scale overflows (the loss's gradient, 2^16, is inf in fp16): DeepSpeed
        # skips and lowers the scale; the guard counts it as a loss-scale skip, not a non-finite one
        assert run["first"][0][1] == "loss_scale", run["first"]


def test_each_rank_verifies_only_its_own_files(engine_runs, tmp_path):
    runs, root = engine_runs
    folder = tmp_path / "damaged"
    shutil.copytree(root / "cpu" / "zero2-fp32" / "checkpoint", folder)
    # a file only rank 1 wrote and lists
    target = next(p for p in (folder / "engine").rglob("*") if p.is_file() and "rank_1" in p.name)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    out = values(run_ranks(_per_rank_verification, 2, str(folder)))
    kind0, message0, hashed0 = out[0]
    kind1, message1, hashed1 = out[1]
    # each rank hashed its own files (rank 1 up to the damaged one); rank 1 also state.json, the
    # small file every rank reads first
    assert set(hashed0) == _own_files(folder, 0)
    damaged = ("manifest-rank1.json", str(target.relative_to(folder)))
    assert damaged in hashed1 and set(hashed1) <= _own_files(folder, 1) | {("manifest-rank0.json", "state.json")}
    assert kind1 == "CheckpointDamaged" and "checksum does not match manifest-rank1.json" in message1
    assert kind0 == "CheckpointDamaged" and "rank 1 found the checkpoint damaged" in message0


@pytest.mark.parametrize("source,stage", [("zero1-fp32", 2), ("zero2-fp32", 1)])
def test_zero_1_and_2_continue_each_other_exactly(engine_runs, source, stage):
    """The one change of ZeRO stage DeepSpeed can continue (trainer/training/resume.py refuses
    the others before any worker starts): the same losses, the same weights to float32 rounding."""
    runs, _ = engine_runs
    for rank in (0, 1):
        crossed, straight = runs[rank][f"{source}->zero{stage}@0.003"], runs[rank][source]
        assert crossed["resumed"] == straight["straight"], rank
        got, want = crossed["resumed_tensors"], straight["straight_tensors"]
        assert got.keys() == want.keys()
        worst = max(float(np.abs(got[k] - want[k]).max(initial=0.0)) for k in want)
        print(f"rank {rank}: {source} resumed under ZeRO-{stage}: largest weight difference {worst:.3g}")
        # not bit for bit: ZeRO-2 reduce-scatters the gradients where ZeRO-1 all-reduces them, and
        # float32 sums in another order round differently in the last bit (measured: 1.5e-8 at most)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_the_configs_learning_rate_wins_over_the_checkpoints(engine_runs):
    runs, _ = engine_runs
    for rank in (0, 1):
        crossed = runs[rank]["zero0-fp32->zero0@0.001"]
        assert crossed["lr"] and all(lr == 0.001 for lr in crossed["lr"])  # saved with 0.003
        # the first resumed step's loss comes before any update: the same as the straight run's
        assert crossed["resumed"][0] == runs[rank]["zero0-fp32"]["straight"][0]


def test_a_damaged_newest_checkpoint_is_passed_over_and_never_started_over_from(engine_runs):
    runs, _ = engine_runs
    for rank in (0, 1):
        restore = runs[rank]["restore"]
        assert restore["step"] == 2  # checkpoint_a, not the damaged step-"9" checkpoint_b
        assert "none of its 1 checkpoints verifies" in restore["lone"]
        assert "refusing to start the run over" in restore["lone"]
