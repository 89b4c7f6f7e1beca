"""Tables at scale: each rank allocates only its own shards, the managed-collision (zch) and
UVM-cached options are planned and refused where the hardware cannot run them, and on a GPU
they train and checkpoint through the real sharded path.

The CPU tests plan in this process (planning needs no process group) or run 2 real gloo ranks;
the `-m gpu` tests run one rank per GPU (up to 2) over nccl (row-wise sharding and FBGEMM's
UVM cache need CUDA), and are skipped here.
"""
import pytest
import torch
from emb_two_ranks import run_two_ranks

from embeddings.checkpoint import load_sharded, save_sharded
from embeddings.config import EmbeddingsConfig, TableConfig
from embeddings.ids import ZCH_ID_RANGE, IdMapper, hash_rows
from embeddings.plan import check_sharding_types, plan_tables, sharders_for
from embeddings.sharded import ShardedTables
from trainer.config import ConfigError, load_config
from umask.errors import UserError

ROWS, DIM = 4096, 32


def zch_cfg(rows: int = ROWS) -> EmbeddingsConfig:
    return EmbeddingsConfig(app=TableConfig(num_embeddings=rows, dim=DIM, collision="zch"),
                            loc=TableConfig(num_embeddings=rows, dim=DIM, collision="zch"),
                            zch_eviction_interval=2)


def local_table_bytes(rank, pg):
    """Bytes of every distinct storage the sharded tables hold on this rank, and the shard
    sizes the plan gave it: the meta-device build leaves nothing else allocated."""
    cfg = EmbeddingsConfig(app=TableConfig(num_embeddings=ROWS, dim=DIM, sharding_types=["table_wise"]),
                           loc=TableConfig(num_embeddings=ROWS, dim=DIM, sharding_types=["table_wise"]))
    module = ShardedTables(cfg, pg, torch.device("cpu"))
    storages = {}
    for tensor in [*module.dmp.parameters(), *module.dmp.buffers(),
                   *(t for lookup in module._lookups() for t in [*lookup.parameters(), *lookup.buffers()])]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    mine = [t for t, p in module.placements.items() if rank in p.ranks]
    (weights,) = [shard.tensor for key, value in module.dmp.state_dict().items() if key.endswith(f"{mine[0]}.weight")
                  for shard in value.local_shards()]
    return sum(storages.values()), mine, weights.clone()


def test_each_rank_allocates_only_its_own_shard():
    results = run_two_ranks(local_table_bytes)
    table_bytes = ROWS * DIM * 4
    bound = (1 / ROWS) ** 0.5  # TorchRec's default init: uniform in [-sqrt(1/rows), sqrt(1/rows)]
    for held, mine, weights in results:
        assert len(mine) == 1  # table_wise: one table per rank
        # its one table (plus row-wise Adagrad's ROWS accumulators and small buffers), not two
        assert table_bytes <= held < 1.5 * table_bytes
        # initialised where it was allocated, with the unsharded table's distribution
        assert weights.shape == (ROWS, DIM) and float(weights.abs().max()) <= bound
        assert float(weights.std()) == pytest.approx(bound / 3**0.5, rel=0.02)


def test_zch_must_be_on_every_table_or_none():
    with pytest.raises(ConfigError, match=r"embeddings\.app\.collision: zch must be set on every table or none"):
        load_config([], ["embeddings.loc.collision=zch"])
    with pytest.raises(ConfigError, match=r"embeddings\.app\.collision: must be one of \['hash', 'zch'\]"):
        load_config([], ["embeddings.app.collision=mch", "embeddings.loc.collision=mch"])


def test_zch_is_refused_on_cpu_before_planning():
    # TorchRec 1.8's ManagedCollisionEmbeddingBagCollectionSharder offers no sharding type on CPU
    with pytest.raises(UserError, match=r"^embeddings\.app\.collision: zch .* shards row_wise only, "
                                        r"which TorchRec 1\.8 offers on CUDA GPUs alone"):
        check_sharding_types(zch_cfg(), "cpu")


def test_zch_plans_row_wise_for_cuda_without_a_gpu():
    cfg = zch_cfg(rows=10**7)
    assert check_sharding_types(cfg, "cuda") == {"app": ["row_wise"], "loc": ["row_wise"]}
    planned = plan_tables(cfg, 2, "cuda", sharders_for(cfg))
    for table in ("app", "loc"):
        placement = planned.placements[table]
        assert placement.sharding_type == "row_wise" and sorted(placement.ranks) == [0, 1]
        assert placement.shard_rows == (5 * 10**6, 5 * 10**6)
    bad = zch_cfg()
    bad.loc.sharding_types = ["table_wise"]
    with pytest.raises(UserError, match=r"embeddings\.loc\.sharding_types: \['table_wise'\] with collision=zch"):
        check_sharding_types(bad, "cuda")


def test_zch_ids_are_hashed_over_the_id_range_not_onto_rows():
    mapper = IdMapper(zch_cfg())
    ids = torch.tensor([5, -3, 2**62, 7], dtype=torch.int64)
    lengths = torch.tensor([2, 2])
    kjt = mapper.to_kjt(ids, lengths, ids, lengths)
    assert torch.equal(kjt["app"].values(), hash_rows(ids, ZCH_ID_RANGE))
    assert int(kjt["app"].values().max()) >= ROWS  # the modules assign rows, not the hash
    assert mapper.out_of_contract() == {"app": 1, "loc": 1}  # the negative id, counted


def test_zch_collection_gives_distinct_ids_distinct_rows_on_cpu():
    # The CPU twin of the GPU path: TorchRec's unsharded managed-collision collection, as
    # build_tables makes it, fed through IdMapper. 40 ids on 64 rows: hashing mod 64 would
    # put some of them together (birthday bound: ~99.99%), the managed modules do not.
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

    from embeddings.tables import build_tables

    cfg = zch_cfg(rows=64)
    built = build_tables(cfg, "cpu")
    assert isinstance(built, ManagedCollisionEmbeddingBagCollection)
    tables = ManagedCollisionEmbeddingBagCollection(
        built._embedding_module, built._managed_collision_collection, return_remapped_features=True)
    ids = torch.arange(40, dtype=torch.int64) * 1_000_003
    lengths = torch.ones(40, dtype=torch.int64)
    kjt = IdMapper(cfg).to_kjt(ids, lengths, ids, lengths)
    for _ in range(cfg.zch_eviction_interval + 1):  # the modules admit new ids at an eviction step
        pooled, remapped = tables(kjt)
    assert pooled.values().shape == (40, 2 * DIM)
    rows = remapped["app"].values()
    assert len(set(rows.tolist())) == 40 and int(rows.max()) < 64
    assert len(set(hash_rows(ids, 64).tolist())) < 40


def _zch_and_uvm_on_gpu(rank, pg, kind, path):
    cfg = zch_cfg() if kind == "zch" else EmbeddingsConfig(
        app=TableConfig(num_embeddings=ROWS, dim=DIM, compute_kernel="fused_uvm_caching", cache_load_factor=0.1),
        loc=TableConfig(num_embeddings=ROWS, dim=DIM, compute_kernel="fused_uvm_caching", cache_load_factor=0.1))
    device = torch.device("cuda", rank)
    module = ShardedTables(cfg, pg, device)
    mapper = IdMapper(cfg)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 2**62, (64,), generator=gen)
    lengths = torch.full((32,), 2)
    kjt = mapper.to_kjt(ids, lengths, ids, lengths).to(device)
    before = module(kjt).detach().clone()
    for _ in range(4):  # zch: 2 eviction intervals; uvm: the cache fills
        module(kjt).sum().backward()
    after = module(kjt).detach()
    save_sharded(module, path, pg)
    restored = ShardedTables(cfg, pg, device)
    load_sharded(restored, path, pg)
    return {"moved": not torch.equal(before, after), "restored": torch.equal(restored(kjt).detach(), after),
            "placements": module.placements, "uvm": module.uvm_cache_counts()}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["zch", "uvm"])
def test_zch_and_uvm_tables_train_and_checkpoint_on_gpus(kind, tmp_path):
    results = run_two_ranks(_zch_and_uvm_on_gpu, kind, str(tmp_path / "tables"), backend="nccl",
                            timeout=600, world_size=min(torch.cuda.device_count(), 2))
    for out in results:
        assert out["moved"] and out["restored"]
        if kind == "uvm":
            assert out["placements"]["app"].compute_kernel == "fused_uvm_caching"
            assert out["uvm"]["uvm_cache_unique_ids"] > 0
            assert 0 <= out["uvm"]["uvm_cache_unique_misses"] <= out["uvm"]["uvm_cache_unique_ids"]
        else:
            assert out["placements"]["app"].sharding_type == "row_wise"


def test_a_zch_checkpoint_is_refused_by_eval_complete_and_export(tmp_path):
    # A whole, verified checkpoint (every file in its manifest) whose config says zch: the
    # refusal comes before any tensor file is read, so empty stand-ins are enough here.
    from trainer.config import save_config
    from trainer.inference.loading import open_checkpoint
    from trainer.training.checkpoint import write_manifest, write_state

    folder = tmp_path / "checkpoint_1"
    (folder / "spec").mkdir(parents=True)
    (folder / "spec" / "spec.json").write_text("{}")
    (folder / "dense.safetensors").write_bytes(b"")
    save_config(load_config([], ["ray.name=zch", "embeddings.app.collision=zch",
                                 "embeddings.loc.collision=zch"]), folder / "config.yaml")
    write_state(folder, step=1, world_size=1, run_name="zch")
    write_manifest(folder, rank=0, run_name="zch")
    with pytest.raises(UserError, match=r"checkpoint_1: its tables use embeddings\.\*\.collision=zch, .* "
                                        r"this checkpoint trains but does not export"):
        open_checkpoint(folder)
