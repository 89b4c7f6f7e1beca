"""Sharded tables on 2 real ranks: plan, lookups, fused optimizer step, DCP round trip.

Each scenario runs once per module (two processes, one process group) and returns plain
tensors; the tests below assert on them. On CPU over gloo: "sharded" (app table-wise, loc
column-wise in two 8-column shards, row-wise Adagrad, sum pooling) and "replicated" (app
data-parallel, loc table-wise, Adagrad, mean pooling). On 2 GPUs over nccl (`-m gpu`):
"row_wise" (app row-wise, loc table-row-wise), the kinds a CPU cannot run.
"""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from emb_two_ranks import run_two_ranks

from embeddings.checkpoint import load_sharded, save_sharded
from embeddings.config import EmbeddingsConfig, TableConfig
from embeddings.ids import IdMapper
from embeddings.sharded import ShardedTables
from embeddings.tables import build_tables
from umask.errors import UserError

LR = 0.05
DIM = 16
ROWS = {"app": 64, "loc": 32}
SCENARIOS = {
    "sharded": dict(app=["table_wise"], loc=["column_wise"], optimizer="row_wise_adagrad",
                    pooling="sum", device="cpu"),
    "replicated": dict(app=["data_parallel"], loc=["table_wise"], optimizer="adagrad",
                       pooling="mean", device="cpu"),
    "row_wise": dict(app=["row_wise"], loc=["table_row_wise"], optimizer="row_wise_adagrad",
                     pooling="sum", device="cuda"),
}
# Per rank: app bags and loc bags for B*T = 4 slots (ids raw, some negative or huge).
BAGS = [
    dict(app=([3, 17, 17, -4, 2**62], [2, 0, 1, 2]), loc=([9, 2**63 - 1, 5], [1, 1, 0, 1])),
    dict(app=([17, 8, 1000], [1, 1, 0, 1]), loc=([11, 9, -9, 12, 7], [2, 0, 2, 1])),
]


def scenario_cfg(name: str) -> EmbeddingsConfig:
    s = SCENARIOS[name]
    return EmbeddingsConfig(
        app=TableConfig(num_embeddings=ROWS["app"], dim=DIM, sharding_types=s["app"]),
        loc=TableConfig(num_embeddings=ROWS["loc"], dim=DIM, sharding_types=s["loc"],
                        column_shard_dim=8),
        pooling=s["pooling"], optimizer=s["optimizer"], lr=LR)


def full_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {t: torch.randn(ROWS[t], DIM, generator=gen) for t in ("app", "loc")}


def local_pieces(value) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(offsets, tensor) of what this rank holds of a state entry: its shards, or all of it."""
    if hasattr(value, "local_shards"):
        return [(tuple(s.metadata.shard_offsets), s.tensor.detach().cpu().clone())
                for s in value.local_shards()]
    return [((0,) * value.dim(), value.detach().cpu().clone())]


def table_pieces(module) -> dict:
    return {key.split(".")[1]: local_pieces(v) for key, v in module.dmp.state_dict().items()}


def optimizer_pieces(module) -> dict:
    return {f"{param}.{slot}": local_pieces(v)
            for param, slots in module.optimizer.state_dict()["state"].items()
            for slot, v in slots.items()}


def same_pieces(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(oa == ob and torch.equal(ta, tb)
                                       for (oa, ta), (ob, tb) in zip(a[k], b[k]))
        for k in a)


def run_scenario(rank, pg, name, ckpt_dir):
    torch.manual_seed(rank)  # ranks initialise differently unless sharding makes them agree
    cfg = scenario_cfg(name)
    device = torch.device("cuda", rank) if SCENARIOS[name]["device"] == "cuda" else torch.device("cpu")
    module = ShardedTables(cfg, pg, device)
    out = {"placements": module.placements, "initial": table_pieces(module)}
    full = full_weights()
    with torch.no_grad():
        for key, value in module.dmp.state_dict().items():
            table = full[key.split(".")[1]]
            for shard in getattr(value, "local_shards", lambda: [])():
                (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(table[r:r + h, c:c + w])
            if not hasattr(value, "local_shards"):
                value.copy_(table)
    reference = build_tables(cfg)
    reference.load_state_dict({f"embedding_bags.{t}.weight": w for t, w in full.items()})

    mapper = IdMapper(cfg)
    bags = {k: (torch.tensor(v), torch.tensor(n)) for k, (v, n) in BAGS[rank].items()}
    kjt = mapper.to_kjt(*bags["app"], *bags["loc"])
    out["looked_up"] = {t: kjt[t].values() for t in ROWS}
    out["out_of_contract"] = mapper.out_of_contract()
    out["pooled_reference"] = reference(kjt).values().detach()
    kjt = kjt.to(device)

    pooled = module(kjt)  # [B*T, 2 * DIM]
    out["pooled"] = pooled.detach().cpu().clone()
    out["before"] = table_pieces(module)
    pooled.sum().backward()  # the fused and the replicated optimizers step in here
    out["after"] = table_pieces(module)

    path = Path(ckpt_dir)
    save_sharded(module, path, pg)
    restored = ShardedTables(cfg, pg, device)
    out["fresh_differs"] = not same_pieces(table_pieces(restored), out["after"])
    load_sharded(restored, path, pg)
    out["weights_restored"] = same_pieces(table_pieces(restored), out["after"])
    out["optimizer_restored"] = same_pieces(optimizer_pieces(restored), optimizer_pieces(module))
    out["optimizer_state_keys"] = sorted(optimizer_pieces(module))
    # One more identical step on both: equal only if the Adagrad state came back too.
    for m in (module, restored):
        m(kjt).sum().backward()
    out["next_step_equal"] = same_pieces(table_pieces(restored), table_pieces(module))
    try:
        load_sharded(restored, path / "missing", pg)
    except UserError as err:
        out["missing_error"] = str(err)
    resized = replace(cfg, loc=replace(cfg.loc, num_embeddings=2 * ROWS["loc"]))
    try:
        load_sharded(ShardedTables(resized, pg, device), path, pg)
    except UserError as err:
        out["resized_error"] = str(err)
    return out


def assemble(pieces_by_rank: list[list], shape) -> torch.Tensor:
    full = torch.full(shape, float("nan"))
    for pieces in pieces_by_rank:
        for (r, c), t in pieces:
            full[r:r + t.shape[0], c:c + t.shape[1]] = t
    return full


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=[pytest.mark.gpu] if s["device"] == "cuda" else [])
    for name, s in SCENARIOS.items()])
def ranks(request, tmp_path_factory):
    name = request.param
    on_gpu = SCENARIOS[name]["device"] == "cuda"
    if on_gpu and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    ckpt = tmp_path_factory.mktemp(name) / "tables"
    results = run_two_ranks(run_scenario, name, str(ckpt), backend="nccl" if on_gpu else "gloo")
    return name, results, ckpt


def test_plan_uses_the_requested_sharding_types(ranks):
    name, results, _ = ranks
    for out in results:
        placements = out["placements"]
        assert placements["app"].sharding_type == SCENARIOS[name]["app"][0]
        assert placements["loc"].sharding_type == SCENARIOS[name]["loc"][0]
    if name == "sharded":
        assert len(placements["app"].ranks) == 1
        assert sorted(placements["loc"].ranks) == [0, 1] and placements["loc"].shard_dims == (8, 8)
    elif name == "replicated":
        assert placements["app"].ranks == (0, 1) and placements["app"].compute_kernel == "dense"
    else:
        assert sorted(placements["app"].ranks) == [0, 1]
    assert results[0]["placements"] == results[1]["placements"]


def test_replicated_tables_start_identical_on_both_ranks(ranks):
    _, results, _ = ranks
    for table, placement in results[0]["placements"].items():
        if placement.sharding_type == "data_parallel":
            (_, replica0), = results[0]["initial"][table]
            (_, replica1), = results[1]["initial"][table]
            assert torch.equal(replica0, replica1)


def test_sharded_lookup_equals_unsharded_collection(ranks):
    _, results, _ = ranks
    for out in results:
        assert out["pooled"].shape == (4, 2 * DIM)
        torch.testing.assert_close(out["pooled"], out["pooled_reference"], rtol=0, atol=1e-6)


def test_negative_ids_were_counted(ranks):
    _, results, _ = ranks
    assert results[0]["out_of_contract"] == {"app": 1, "loc": 0}
    assert results[1]["out_of_contract"] == {"app": 0, "loc": 1}


def test_backward_steps_exactly_the_looked_up_rows(ranks):
    _, results, _ = ranks
    for table, rows in ROWS.items():
        before = assemble([out["before"][table] for out in results], (rows, DIM))
        after = assemble([out["after"][table] for out in results], (rows, DIM))
        assert not before.isnan().any() and not after.isnan().any()
        looked_up = set(torch.cat([out["looked_up"][table] for out in results]).tolist())
        changed = set((before != after).any(dim=1).nonzero().flatten().tolist())
        assert changed == looked_up
        # First Adagrad step (either flavour): every coordinate of a row with gradient g moves
        # by lr * g / (|g| + eps) = lr against the gradient; the gradient here is positive.
        delta = (before - after)[sorted(looked_up)]
        torch.testing.assert_close(delta, torch.full_like(delta, LR), rtol=1e-5, atol=1e-6)
        if results[0]["placements"][table].sharding_type == "data_parallel":
            (_, replica0), = results[0]["after"][table]
            (_, replica1), = results[1]["after"][table]
            assert torch.equal(replica0, replica1)  # the replicas stepped alike


def test_checkpoint_round_trip_is_bit_exact_with_optimizer_state(ranks):
    name, results, ckpt = ranks
    for out in results:
        assert out["fresh_differs"]  # otherwise restoring would prove nothing
        assert out["weights_restored"] and out["optimizer_restored"] and out["next_step_equal"]
    keys = set(results[0]["optimizer_state_keys"]) | set(results[1]["optimizer_state_keys"])
    if name == "replicated":
        assert keys == {"embedding_bags.app.weight.step", "embedding_bags.app.weight.sum",
                        "embedding_bags.loc.weight.loc.momentum1"}
    else:
        assert keys == {"embedding_bags.app.weight.app.momentum1",
                        "embedding_bags.loc.weight.loc.momentum1"}


def test_checkpoint_is_safetensors_per_rank_without_pickle(ranks):
    _, _, ckpt = ranks
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["shard-00001-model-00001-of-00001.safetensors",
                     "shard-00002-model-00001-of-00001.safetensors"]


def test_missing_or_misfit_checkpoint_is_a_user_error(ranks):
    _, results, ckpt = ranks
    for out in results:
        assert out["missing_error"] == f"embeddings checkpoint not found: {ckpt / 'missing'}"
        assert out["resized_error"].startswith(f"embeddings checkpoint {ckpt} does not fit "
                                               f"these tables"), out["resized_error"]
        assert f"embedding_bags.loc.weight saved [{ROWS['loc']}, " in out["resized_error"]
        assert f"configured now [{2 * ROWS['loc']}, " in out["resized_error"]
        assert "embedding_bags.app" not in out["resized_error"]


def build_oversized(rank, pg):
    cfg = EmbeddingsConfig(app=TableConfig(num_embeddings=2**20, dim=64),
                           loc=TableConfig(num_embeddings=2**20, dim=64), planner_memory_gb=0.1)
    try:
        ShardedTables(cfg, pg, torch.device("cpu"))
    except UserError as err:
        return str(err)
    return "built"


def test_tables_that_fit_nowhere_fail_on_every_rank_without_hanging():
    messages = run_two_ranks(build_oversized, timeout=60)
    assert messages[0] == messages[1]
    assert messages[0].startswith("embeddings: no sharding plan fits the tables on 2 cpu rank(s)")
