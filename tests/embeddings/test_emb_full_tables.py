"""load_full_tables: tables saved sharded over 2 real gloo ranks come back whole in one process.

The app table is table-wise (all on one rank) and the loc table column-wise in two 8-column
shards on different ranks, so the loaded loc table is stitched from both ranks' files.
"""
from dataclasses import replace

import pytest
import torch
from emb_two_ranks import run_two_ranks

from embeddings.checkpoint import load_full_tables, save_sharded
from embeddings.config import EmbeddingsConfig, TableConfig
from embeddings.ids import IdMapper
from embeddings.sharded import ShardedTables
from umask.errors import UserError

ROWS = {"app": 48, "loc": 40}
CFG = EmbeddingsConfig(
    app=TableConfig(num_embeddings=ROWS["app"], dim=16, sharding_types=["table_wise"]),
    loc=TableConfig(num_embeddings=ROWS["loc"], dim=16, sharding_types=["column_wise"],
                    column_shard_dim=8))


def save_trained_shards(rank, pg, path):
    """One fused optimizer step (so weights and accumulators differ from init), then save.

    Returns this rank's shards as (table, row offset, column offset, tensor).
    """
    torch.manual_seed(rank)
    module = ShardedTables(CFG, pg, torch.device("cpu"))
    kjt = IdMapper(CFG).to_kjt(torch.tensor([1, 2, 3 + rank]), torch.tensor([2, 1]),
                               torch.tensor([5]), torch.tensor([0, 1]))
    module(kjt).pow(2).sum().backward()
    save_sharded(module, path, pg)
    return [(key.split(".")[1], *shard.metadata.shard_offsets, shard.tensor.detach().clone())
            for key, value in module.dmp.state_dict().items() for shard in value.local_shards()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tables") / "tables"
    shards = [s for rank_shards in run_two_ranks(save_trained_shards, str(path)) for s in rank_shards]
    return path, shards


def test_full_tables_equal_the_saved_shards_bit_for_bit(saved):
    path, shards = saved
    tables = load_full_tables(CFG, path)
    weights = {name: tables.embedding_bags[name].weight for name in ROWS}
    assert {name: tuple(w.shape) for name, w in weights.items()} == {"app": (48, 16), "loc": (40, 16)}
    covered = {name: torch.zeros_like(w, dtype=torch.bool) for name, w in weights.items()}
    assert len(shards) == 3  # app whole on one rank, loc in two column shards
    for name, row, col, shard in shards:
        rows, cols = shard.shape
        assert torch.equal(weights[name][row:row + rows, col:col + cols], shard)
        covered[name][row:row + rows, col:col + cols] = True
    assert all(c.all() for c in covered.values())
    assert not any(w.requires_grad for w in weights.values())


def test_missing_or_resized_tables_are_user_errors(saved, tmp_path):
    path, _ = saved
    with pytest.raises(UserError, match="not found"):
        load_full_tables(CFG, tmp_path / "nothing")
    resized = replace(CFG, loc=replace(CFG.loc, num_embeddings=2 * ROWS["loc"]))
    with pytest.raises(UserError, match="does not fit"):
        load_full_tables(resized, path)


def test_one_rank_holding_both_column_shards_saves_both(tmp_path):
    """A safetensors header keys tensors by name, so a rank's second chunk of one tensor goes
    to a file of its own (embeddings.checkpoint._one_chunk_per_name); before, one worker holding
    both loc column shards, as a resharded run to fewer workers plans it, saved only one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(5)
        module = ShardedTables(CFG, dist.group.WORLD, torch.device("cpu"))
        shards = module.dmp.state_dict()["embedding_bags.loc.weight"].local_shards()
        assert len(shards) == 2  # both column shards on the one rank
        save_sharded(module, tmp_path / "tables")
        loc = torch.cat([s.tensor.detach() for s in sorted(shards, key=lambda s: s.metadata.shard_offsets[1])], 1)
    finally:
        dist.destroy_process_group()
    assert len(list((tmp_path / "tables").glob("*.safetensors"))) == 2
    assert torch.equal(load_full_tables(CFG, tmp_path / "tables").embedding_bags["loc"].weight, loc)
