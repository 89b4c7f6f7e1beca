"""Sharding plans: per-table constraints from config, the early CPU check, config validation.

The planner runs in this process for a world of 2 (planning needs no process group); the
2-process tests in test_emb_sharded.py check that real ranks shard as planned.
"""
import pytest
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

from embeddings.config import SHARDING_TYPES, EmbeddingsConfig, TableConfig
from embeddings.plan import (AVAILABLE_SHARDING_TYPES, check_sharding_types, describe_plan, plan_lines,
                             plan_tables, replicated, sharders_for, table_bytes)
from embeddings.tables import build_tables
from trainer.config import ConfigError, load_config
from umask.errors import UserError


def cfg_with(app_types, loc_types, **loc) -> EmbeddingsConfig:
    return EmbeddingsConfig(
        app=TableConfig(num_embeddings=64, dim=16, sharding_types=app_types),
        loc=TableConfig(num_embeddings=32, dim=16, sharding_types=loc_types, **loc))


def test_row_wise_on_cpu_fails_early_naming_table_request_and_offer():
    cfg = cfg_with(["table_wise"], ["row_wise", "column_wise"])
    with pytest.raises(UserError) as err:
        check_sharding_types(cfg, "cpu")
    assert str(err.value) == (
        "embeddings.loc.sharding_types: ['row_wise'] cannot run on cpu "
        "(asked for ['row_wise', 'column_wise']); available on cpu: "
        "['data_parallel', 'table_wise', 'column_wise', 'table_column_wise']. "
        "Row-wise sharding needs CUDA GPUs.")


def test_row_wise_is_allowed_on_cuda_and_empty_means_any():
    never_replicate = cfg_with([], ["row_wise", "table_row_wise"])
    never_replicate.replicate_max_mb = 0
    allowed = check_sharding_types(never_replicate, "cuda")
    assert allowed == {"app": list(SHARDING_TYPES), "loc": ["row_wise", "table_row_wise"]}
    anything = cfg_with([], [])
    anything.replicate_max_mb = 0
    assert check_sharding_types(anything, "cpu")["app"] == list(AVAILABLE_SHARDING_TYPES["cpu"])


def test_small_tables_that_ask_for_nothing_are_replicated_by_size():
    # 64 x 16 fp32 rows + 64 row-wise Adagrad sums = 4,352 bytes; a 2^16 x 16 table is 4.25 MiB
    cfg = cfg_with([], [])
    assert table_bytes(cfg, "app") == 4 * (64 * 16 + 64)
    assert replicated(cfg) == ["app", "loc"]
    assert check_sharding_types(cfg, "cpu") == {"app": ["data_parallel"], "loc": ["data_parallel"]}
    planned = plan_tables(cfg, 2, "cpu", [EmbeddingBagCollectionSharder()]).placements
    assert {p.sharding_type for p in planned.values()} == {"data_parallel"}
    cfg.loc.num_embeddings = 2**16
    assert replicated(cfg) == ["app"]  # above replicate_max_mb = 2: the planner shards it
    cfg.replicate_max_mb = 5
    assert replicated(cfg) == ["app", "loc"]
    cfg.planner_memory_gb = 4 / 1024  # 4 MiB per rank, 15 % reserved: 3.4 MiB offered
    assert replicated(cfg) == ["app"]
    cfg.planner_memory_gb, cfg.optimizer = 0.0, "adagrad"  # a sum per element: 8 MiB
    assert replicated(cfg) == ["app"]
    asked = cfg_with(["table_wise"], [], compute_kernel="fused_uvm_caching")
    assert replicated(asked) == []  # what a table asks for wins, and a cache needs a shard


def test_unknown_device_type_is_a_user_error():
    with pytest.raises(UserError, match="no sharding support for device type 'mps'"):
        check_sharding_types(cfg_with([], []), "mps")


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_cpu_offer_matches_what_torchrec_can_plan(sharding_type):
    # Our static table must agree with TorchRec's own enumerator, asked without our check.
    constraints = {name: ParameterConstraints(sharding_types=[sharding_type])
                   for name in ("app", "loc")}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"),
                                       constraints=constraints, debug=False)
    module = build_tables(cfg_with([], []), device="meta")
    if sharding_type in AVAILABLE_SHARDING_TYPES["cpu"]:
        plan = describe_plan(planner.plan(module, [EmbeddingBagCollectionSharder()]))
        assert {p.sharding_type for p in plan.values()} == {sharding_type}
    else:
        with pytest.raises(RuntimeError, match="No available sharding type"):
            planner.plan(module, [EmbeddingBagCollectionSharder()])


def test_plan_follows_per_table_constraints():
    cfg = cfg_with(["table_wise"], ["column_wise"], column_shard_dim=8)
    plan = plan_tables(cfg, 2, "cpu", [EmbeddingBagCollectionSharder()]).placements
    assert plan["app"].sharding_type == "table_wise" and plan["app"].compute_kernel == "fused"
    assert len(plan["app"].ranks) == 1 and plan["app"].shard_dims == (16,)
    assert plan["loc"].sharding_type == "column_wise" and plan["loc"].compute_kernel == "fused"
    assert sorted(plan["loc"].ranks) == [0, 1] and plan["loc"].shard_dims == (8, 8)


def test_data_parallel_table_is_dense_and_everywhere():
    cfg = cfg_with(["data_parallel"], ["table_wise"])
    plan = plan_tables(cfg, 2, "cpu", [EmbeddingBagCollectionSharder()]).placements
    assert plan["app"].sharding_type == "data_parallel" and plan["app"].compute_kernel == "dense"
    assert plan["app"].ranks == (0, 1)
    assert plan["loc"].sharding_type == "table_wise"


def test_plan_tables_checks_hardware_before_planning():
    with pytest.raises(UserError, match=r"embeddings\.app\.sharding_types: \['table_row_wise'\]"):
        plan_tables(cfg_with(["table_row_wise"], []), 2, "cpu", [EmbeddingBagCollectionSharder()])


@pytest.mark.parametrize("override,message", [
    ("embeddings.app.sharding_types=[rowwise]", r"embeddings\.app\.sharding_types: unknown \['rowwise'\]"),
    ("embeddings.loc.column_shard_dim=5", r"embeddings\.loc\.column_shard_dim: must divide dim \(16\)"),
    ("embeddings.pooling=max", r"embeddings\.pooling: must be one of \['sum', 'mean'\]"),
    ("embeddings.optimizer=sgd", r"embeddings\.optimizer: must be one of"),
    ("embeddings.eps=0", r"embeddings\.eps: must be positive"),
])
def test_bad_embedding_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message + r".*\(set in the command line\)"):
        load_config([], [override])


def test_row_wise_plans_for_cuda_without_a_gpu():
    # The planner only models the hardware, so the GPU plan is checked here on CPU.
    cfg = cfg_with(["row_wise"], ["table_row_wise"])
    plan = plan_tables(cfg, 2, "cuda", [EmbeddingBagCollectionSharder()]).placements
    assert plan["app"].sharding_type == "row_wise" and sorted(plan["app"].ranks) == [0, 1]
    assert plan["loc"].sharding_type == "table_row_wise" and plan["app"].compute_kernel == "fused"


def test_tables_too_big_for_the_memory_budget_are_a_user_error():
    # 2 tables of 2^20 x 64 fp32 = 256 MiB each (plus optimizer state) on 2 ranks of 0.25 GiB.
    cfg = EmbeddingsConfig(app=TableConfig(num_embeddings=2**20, dim=64, sharding_types=["table_wise"]),
                           loc=TableConfig(num_embeddings=2**20, dim=64, sharding_types=["table_wise"]),
                           planner_memory_gb=0.25)
    with pytest.raises(UserError, match=r"no sharding plan fits the tables on 2 cpu rank\(s\)"):
        plan_tables(cfg, 2, "cpu", [EmbeddingBagCollectionSharder()])
    cfg.planner_memory_gb = 2.0
    plan = plan_tables(cfg, 2, "cpu", [EmbeddingBagCollectionSharder()]).placements
    assert sorted(plan["app"].ranks + plan["loc"].ranks) == [0, 1]  # one table per rank


def test_plan_carries_the_planners_memory_estimate_and_says_why_it_fits():
    # 2^20 x 64 fp32 is 256 MiB of rows; the planner adds row-wise Adagrad's state and the
    # lookups' working memory, so each estimate is a little above it.
    cfg = EmbeddingsConfig(app=TableConfig(num_embeddings=2**20, dim=64, sharding_types=["table_wise"]),
                           loc=TableConfig(num_embeddings=2**20, dim=64, sharding_types=["table_wise"]),
                           planner_memory_gb=2.0)
    planned = plan_tables(cfg, 2, "cpu", [EmbeddingBagCollectionSharder()])
    assert planned.rank_memory_bytes == planned.rank_available_bytes == 2 * 2**30  # no RAM reserved
    for table in ("app", "loc"):
        (estimate,) = planned.placements[table].shard_device_bytes
        assert 2**28 <= estimate < 1.1 * 2**28
        assert planned.placements[table].shard_rows == (2**20,)
    lines = plan_lines(planned, cfg)
    assert lines[0].startswith("embedding plan: each cpu rank offers the tables 2.00 GiB of RAM "
                               "(embeddings.planner_memory_gb=2, none of it reserved); the fullest, rank ")
    assert lines[0].endswith(" (13%)") and len(lines) == 3
    assert lines[1].startswith("  app (1,048,576 x 64): table_wise, kernel fused; rank ")
    assert ": 1,048,576 x 64, ~0.25 GiB" in lines[1]


def test_uvm_caching_is_refused_on_cpu_before_planning():
    cfg = cfg_with([], [], compute_kernel="fused_uvm_caching")
    with pytest.raises(UserError, match=r"^embeddings\.loc\.compute_kernel: fused_uvm_caching keeps the "
                                        r"table in host memory .* needs CUDA GPUs \(ray\.use_gpu=true\)"):
        check_sharding_types(cfg, "cpu")


def test_uvm_caching_plans_for_cuda_without_a_gpu():
    # 10^8 x 64 rows cached at 10% in HBM: the rows are host memory, the cache is HBM.
    cfg = EmbeddingsConfig(
        app=TableConfig(num_embeddings=10**8, dim=64, compute_kernel="fused_uvm_caching",
                        cache_load_factor=0.1),
        loc=TableConfig(num_embeddings=10**6, dim=64, sharding_types=["data_parallel", "table_wise"],
                        compute_kernel="fused_uvm_caching"),
        planner_memory_gb=80)
    assert check_sharding_types(cfg, "cuda")["loc"] == ["table_wise"]  # a replica has no cache
    planned = plan_tables(cfg, 2, "cuda", sharders_for(cfg))
    app = planned.placements["app"]
    assert app.compute_kernel == "fused_uvm_caching" and planned.uvm_cache_stats
    rows = sum(app.shard_rows) if app.sharding_type != "table_wise" else app.shard_rows[0]
    assert rows == 10**8
    assert sum(app.shard_host_bytes) >= 10**8 * 64 * 4  # every row lives in host memory
    assert sum(app.shard_device_bytes) < 0.2 * sum(app.shard_host_bytes)  # the HBM cache is ~10%
    assert planned.placements["loc"].compute_kernel == "fused_uvm_caching"
    assert any("HBM +" in line for line in plan_lines(planned, cfg))


@pytest.mark.parametrize("override,message", [
    ("embeddings.app.compute_kernel=uvm", r"embeddings\.app\.compute_kernel: must be one of \['fused', 'fused_uvm_caching'\]"),
    ("embeddings.app.cache_load_factor=0", r"embeddings\.app\.cache_load_factor: must be in \(0, 1\]"),
])
def test_bad_kernel_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])
