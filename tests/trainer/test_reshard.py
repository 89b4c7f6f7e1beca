"""Resharding: a checkpoint written by 2 workers resumes on 1, and one written by 1 on 2.

Real Trainers (trainer/training/loop.py) on spawned gloo ranks, with real DeepSpeed engines,
TorchRec-sharded tables and DCP files, through Trainer.write_checkpoint and load_checkpoint
(what save and restore do around Ray Train). Per combo of ZeRO stage, precision and table
placement: 2 ranks train 2 steps and checkpoint; 1 rank loads that, trains 1 step and
checkpoints; 2 ranks load that. Before each save and after each load every rank gathers the
full state, independently of the checkpoint code: each table and optimizer accumulator whole
(ShardedTensor.gather, or the replicated tensor), each dense weight with its AdamW moments
(DeepSpeed's safe_get_full_* under ZeRO, the torch optimizer's state under ZeRO-0) and the
AdamW step. After a load they must equal those before the save bit for bit. The combos cover
a fused table-wise table with a replicated (data_parallel) one, a column-wise table whose
row-wise Adagrad keeps an accumulator per column shard, and the default plan; ZeRO-0 (loaded
as saved), ZeRO-1, 2 and 3 (through DeepSpeed's universal checkpoint), fp32 and bf16.
Then `u-mask train` through embedded Ray resumes the 2-worker straight_run on 1 worker.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gloo_ranks import run_ranks, values

from trainer.training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

TABLES = {
    "fused+replicated": ("embeddings.app.sharding_types=[table_wise]", "embeddings.loc.sharding_types=[data_parallel]"),
    "column-wise": ("embeddings.app.sharding_types=[column_wise]", "embeddings.app.column_shard_dim=8",
                    "embeddings.loc.sharding_types=[table_wise]"),
    "planner's": (),
}
COMBOS = [("zero0-fp32", 0, "fp32", "fused+replicated"), ("zero1-fp32", 1, "fp32", "column-wise"),
          ("zero2-bf16", 2, "bf16", "planner's"), ("zero3-fp32", 3, "fp32", "planner's")]


def _config(base, stage: int, precision: str, tables: str):
    from trainer.config import load_config

    cfg = load_config([base["config"]], [*base["overrides"], *TABLES[tables]])
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=stage,
                                                                  precision=precision))


def _trainer(cfg, run_dir: Path):
    from trainer.training import loop

    class Local(loop.Trainer):
        """The real Trainer, without Ray Train around save and restore."""

        def restore(self) -> None:
            pass

        def save(self, metrics) -> None:
            pass

    return Local(cfg, run_dir)


def _full_state(trainer) -> dict[str, np.ndarray]:
    """Every table, accumulator, dense weight, AdamW moment and step, whole (collective); as
    numpy, filled on every rank (the gathered ones on rank 0, then broadcast)."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    mine = {}  # key -> (global shape, [(offsets, tensor)]): this rank's shards, or the replicated whole
    for key, value in trainer.tables.state_dict().items():
        pieces = ([(tuple(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
                  if hasattr(value, "local_shards") else [((0,) * value.dim(), value.detach().clone())])
        mine[key] = (tuple(value.size()), pieces)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)  # one collective: a rank may hold no entry of a table
    out = {}
    for key in sorted({key for held in ranks for key in held}):
        shape = next(held[key][0] for held in ranks if key in held)
        full = torch.full(shape, float("nan"))
        for held in ranks:
            for offsets, tensor in held.get(key, (None, []))[1]:
                full[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor.float()
        assert not torch.isnan(full).any(), f"{key}: the shards do not cover the tensor"
        out[key] = full.numpy()
    engine = trainer.engine
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for name, param in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
            state = base.state[param]
            weight, moments = param.detach(), (state["exp_avg"], state["exp_avg_sq"])
        else:
            weight = safe_get_full_fp32_param(param)
            moments = tuple(safe_get_full_optimizer_state(param, k) for k in ("exp_avg", "exp_avg_sq"))
        for suffix, tensor in zip(("", ".exp_avg", ".exp_avg_sq"), (weight, *moments)):
            out[f"dense.{name}{suffix}"] = tensor.detach().float().clone().numpy()
    steps = {float(state["step"]) for state in base.state.values() if "step" in state}
    out["adamw.step"] = np.array(sorted(steps))
    return out


def _save(trainer, folder: Path) -> None:
    """Trainer.write_checkpoint into a folder of this rank's own, merged into `folder` as Ray
    Train merges the ranks' folders."""
    import torch.distributed as dist

    own = folder.parent / f"{folder.name}-rank{trainer.rank}"
    trainer.write_checkpoint(own)
    shutil.copytree(own, folder, dirs_exist_ok=True)
    dist.barrier()


def _phase(rank: int, base: dict, root: str, phase: str) -> dict:
    """phase "2": train 2 steps, save. "1": load phase 2's, train 1 step, save. "2 again": load
    phase 1's, and try it under a plan that changes a table's optimizer layout."""
    import torch.distributed as dist

    from umask.errors import UserError

    results = {}
    for name, stage, precision, tables in COMBOS:
        cfg = _config(base, stage, precision, tables)
        run = Path(root) / name
        trainer = _trainer(cfg, run / f"run-{phase}")
        out = results[name] = {}
        if phase in ("1", "2 again"):
            trainer.load_checkpoint(run / ("from2" if phase == "1" else "from1"))
            out["loaded"] = _full_state(trainer)
            out["step"] = trainer.step
            out["loader"] = trainer.loader.state_dict()
            out["batches_per_epoch"] = trainer.loader.batches_per_epoch(0)
        if phase == "2 again":
            if name == "zero0-fp32":  # loc saved replicated, now forced onto one rank, table-wise
                moved = _config(base, stage, precision, "column-wise")
                try:
                    _trainer(moved, run / "moved").load_checkpoint(run / "from1")
                except UserError as err:
                    out["moved"] = str(err)
            dist.barrier()
            continue
        for _ in range(2 if phase == "2" else 1):
            trainer.train_step()
        out["saved"] = _full_state(trainer)
        out["saved_loader"] = trainer.loader.state_dict()
        out["saved_batches_per_epoch"] = trainer.loader.batches_per_epoch(0)
        _save(trainer, run / ("from2" if phase == "2" else "from1"))
    return results


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("reshard")
    base = {"config": str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"),
            "overrides": [f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
                          "ray.name=reshard", "deepspeed.lr=0.003"]}
    two = values(run_ranks(_phase, 2, base, str(root), "2", collective_timeout_s=120))
    one = values(run_ranks(_phase, 1, base, str(root), "1", collective_timeout_s=120))
    again = values(run_ranks(_phase, 2, base, str(root), "2 again", collective_timeout_s=120))
    return two, one, again, root


def _assert_equal(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for key, value in want.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), f"{where}: {key}"


@pytest.mark.parametrize("name", [c[0] for c in COMBOS])
def test_two_workers_checkpoint_resumes_on_one_exactly(resharded, name):
    two, one, _, _ = resharded
    _assert_equal(one[0][name]["loaded"], two[0][name]["saved"], f"{name} 2->1")
    assert one[0][name]["step"] == 2


@pytest.mark.parametrize("name", [c[0] for c in COMBOS])
def test_one_workers_checkpoint_resumes_on_two_exactly(resharded, name):
    _, one, again, _ = resharded
    for rank in (0, 1):
        _assert_equal(again[rank][name]["loaded"], one[0][name]["saved"], f"{name} 1->2 rank {rank}")
        assert again[rank][name]["step"] == 3


def test_the_state_compared_is_the_whole_state(resharded):
    """The comparison is not vacuous: both tables, both kinds of optimizer state, every dense
    weight with both moments, and the AdamW step, all moved by training."""
    two, _, _, _ = resharded
    state = two[0]["zero0-fp32"]["saved"]
    assert {"tables.embedding_bags.app.weight", "tables.embedding_bags.loc.weight",
            "optimizer.embedding_bags.app.weight.app.momentum1",  # fused, table-wise
            "optimizer.embedding_bags.loc.weight.sum"} <= state.keys()  # replicated
    assert float(np.abs(state["optimizer.embedding_bags.app.weight.app.momentum1"]).sum()) > 0
    assert float(np.abs(state["optimizer.embedding_bags.loc.weight.sum"]).sum()) > 0
    dense = [k for k in state if k.startswith("dense.") and k.endswith(".exp_avg_sq")]
    assert len(dense) > 40 and all(float(np.abs(state[k]).sum()) > 0 for k in dense[:5])
    assert state["adamw.step"].tolist() == [2.0]
    column = two[0]["zero1-fp32"]["saved"]["optimizer.embedding_bags.app.weight.app.momentum1"]
    assert column.shape == (2 * 4096,)  # row-wise Adagrad: one accumulator per row and column shard


def test_the_loader_deals_the_rest_of_the_epoch_to_the_new_world(resharded):
    two, one, again, _ = resharded
    saved = two[0]["zero0-fp32"]["saved_loader"]
    assert (saved["epoch"], saved["batches_in_epoch"]) == (0, 2)
    # inside epoch 0 at 2 workers: 1 worker reads the rest of epoch 0 (trainer/data/loader.py)
    loader = one[0]["zero0-fp32"]["loader"]
    assert (loader["epoch"], loader["batches_in_epoch"], loader["world_size"], loader["bridge"]) == (0, 0, 1, [[2, 2]])
    # 1 worker checkpointed after one batch of that rest: 2 workers take what is left of it
    for rank in (0, 1):
        loader = again[rank]["zero0-fp32"]["loader"]
        assert (loader["epoch"], loader["batches_in_epoch"], loader["world_size"], loader["rank"],
                loader["bridge"]) == (0, 0, 2, rank, [[2, 2], [1, 1]])


def test_a_table_whose_optimizer_layout_changes_is_named(resharded):
    _, _, again, _ = resharded
    message = again[0]["zero0-fp32"]["moved"]
    assert "\n" not in message
    assert "the tables' optimizer state cannot move to this sharding plan" in message
    assert "table 'loc' saved step [], sum [4096, 1] (data_parallel on ranks (0,))" in message
    assert "planned now as momentum1 [4096] (table_wise" in message
    assert "set embeddings.loc.sharding_types=[data_parallel]" in message


def test_the_examples_left_out_by_a_reshard_are_counted(tiny_dataset):
    from trainer.data.loader import ShardedLoader

    features = tiny_dataset / "features"
    two = [ShardedLoader(features, rank, 2, batch_size=8, seed=0, prefetch=False) for rank in (0, 1)]
    per_rank = two[0].batches_per_epoch(0)
    for loader in two:
        for _ in range(3):
            next(loader)
    one = ShardedLoader(features, 0, 1, batch_size=8, seed=0, prefetch=False)
    # the rest, 2 * (per_rank - 3) batches of 8, fills whole batches of the one worker: none left out
    assert one.load_resharded_state(two[1].state_dict()) == 0
    assert one._bridge_now.num_batches == 2 * (per_rank - 3)
    three = ShardedLoader(features, 0, 3, batch_size=8, seed=0, prefetch=False)
    rest = 2 * (per_rank - 3) * 8
    assert three.load_resharded_state(two[1].state_dict()) == rest - rest // 24 * 24
    # on a boundary nothing is left out: before the first batch, and after the last
    fresh = ShardedLoader(features, 0, 2, batch_size=8, seed=0, prefetch=False)
    assert one.load_resharded_state(fresh.state_dict()) == 0 and one.state_dict()["epoch"] == 0
    for _ in range(per_rank):
        next(fresh)
    assert one.load_resharded_state(fresh.state_dict()) == 0 and one.state_dict()["epoch"] == 1
    from umask.errors import UserError

    with pytest.raises(UserError, match="saved with batch_size=8 but this run has batch_size=4"):
        ShardedLoader(features, 0, 1, batch_size=4, seed=0, prefetch=False).load_resharded_state(
            two[0].state_dict())


def test_u_mask_train_resumes_a_two_worker_run_on_one(tmp_path, tiny_config, straight_run, straight_overrides):
    """The whole path through embedded Ray: the driver's checks let the new world size through,
    the one worker verifies all of the 2 ranks' files, reshards and trains on."""
    from trainer.training.launch import train

    run = tmp_path / "runs" / "straight"
    shutil.copytree(straight_run, run, ignore=shutil.ignore_patterns("logs"))
    result = train(tiny_config("ray.name=straight", "ray.num_workers=1", *straight_overrides[1:],
                               "train.steps=10"))
    assert result.error is None and result.metrics["step"] == 10
    log = (run / "logs" / "rank-0.log").read_text()
    assert "resumed at step 8" in log
    # the straight run's checkpoint at step 8 is inside epoch 0: its rest goes to the one worker
    assert "from 2 workers to 1: the rest of epoch 0 is dealt to the 1 workers" in log
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert (state["step"], state["world_size"]) == (10, 1)
