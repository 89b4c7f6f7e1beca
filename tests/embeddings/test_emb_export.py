"""write_table_parquet: tables saved sharded over 2 real gloo ranks, written as Parquet block by
block, equal the full tables bit for bit; a table larger than the writing process may hold
is written under that memory limit.

The app table is table-wise (whole on one rank), the loc table column-wise in two shards on
different ranks, so every loc block is stitched from both ranks' files.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from emb_two_ranks import run_two_ranks

from embeddings.checkpoint import load_full_tables, save_sharded
from embeddings.config import EmbeddingsConfig, TableConfig
from embeddings.export import table_shards, write_table_parquet
from embeddings.sharded import ShardedTables
from umask.bundle_format import table_schema
from umask.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
CFG = EmbeddingsConfig(
    app=TableConfig(num_embeddings=45, dim=16, sharding_types=["table_wise"]),
    loc=TableConfig(num_embeddings=40, dim=16, sharding_types=["column_wise"], column_shard_dim=8))


def save_shards(rank, pg, cfg, path):
    torch.manual_seed(rank)
    save_sharded(ShardedTables(cfg, pg, torch.device("cpu")), path, pg)


def parquet_table(path: Path) -> np.ndarray:
    table = pq.read_table(path)
    dim = table.schema.field("vector").type.list_size
    assert table.schema == table_schema(dim)
    assert table.column("row").to_numpy().tolist() == list(range(table.num_rows))
    return table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tables") / "tables"
    run_two_ranks(save_shards, CFG, str(path))
    return path


def test_parquet_tables_equal_the_full_tables_at_any_block_size(saved, tmp_path):
    full = load_full_tables(CFG, saved)
    assert sorted((s.row, s.col, s.rows, s.cols) for s in table_shards(saved, "loc")) == [(0, 0, 40, 8), (0, 8, 40, 8)]
    assert len({s.file for s in table_shards(saved, "loc")}) == 2  # one file per rank
    for name, table in CFG.tables().items():
        for block_rows in (7, 1 << 16):  # blocks that split the table unevenly, and one block
            out = tmp_path / f"{name}-{block_rows}.parquet"
            write_table_parquet(saved, name, table.num_embeddings, table.dim, out, block_rows=block_rows)
            assert np.array_equal(parquet_table(out), full.embedding_bags[name].weight.numpy())
    assert pq.ParquetFile(tmp_path / "loc-7.parquet").metadata.num_row_groups == 6  # ceil(40 / 7)


def test_a_missing_shard_or_a_wrong_size_is_one_clear_error(saved, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    loc_files = sorted({s.file for s in table_shards(saved, "loc")})
    (partial / loc_files[1].name).write_bytes(loc_files[1].read_bytes())  # one of the two column shards
    with pytest.raises(UserError, match=r"row 0, column \d+ of table 'loc' is in no shard"):
        write_table_parquet(partial, "loc", 40, 16, tmp_path / "loc.parquet")
    with pytest.raises(UserError, match=r"outside the configured 20 x 16 table"):
        write_table_parquet(saved, "loc", 20, 16, tmp_path / "loc.parquet")
    with pytest.raises(UserError, match=r"no shard of table 'app'"):
        write_table_parquet(partial, "app", 45, 16, tmp_path / "app.parquet")


BIG = EmbeddingsConfig(  # loc: 2^21 x 64 float32 = 512 MiB, in two column-wise shards of 256 MiB
    app=TableConfig(num_embeddings=8, dim=8, sharding_types=["table_wise"]),
    loc=TableConfig(num_embeddings=1 << 21, dim=64, sharding_types=["column_wise"], column_shard_dim=32))
LIMIT = 384 << 20  # RLIMIT_DATA of the writing process: under the table's 512 MiB


@pytest.mark.slow
def test_a_table_larger_than_the_memory_limit_streams_to_parquet(tmp_path):
    """The writer runs in a process whose data segment (heap and private memory) may not grow
    past LIMIT, below the table's size, and writes the whole table correctly. (Its resident
    set may still pass LIMIT: the pages of the mapped safetensors files count there, and the
    kernel reclaims them as it needs.)

    Arrow allocates from the system allocator here: its default, mimalloc, reserves about
    1 GiB of address space up front, which RLIMIT_DATA counts although it is never touched.
    """
    path = tmp_path / "tables"
    run_two_ranks(save_shards, BIG, str(path), timeout=600)
    out = tmp_path / "loc.parquet"
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_DATA, ({LIMIT}, {LIMIT}))
        from embeddings.export import write_table_parquet
        write_table_parquet({str(path)!r}, "loc", {1 << 21}, 64, {str(out)!r})
    """)
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table_bytes = (1 << 21) * 64 * 4
    # and the limit binds: the same process cannot hold the table
    refused = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_DATA, ({LIMIT}, {LIMIT}))
        import numpy as np
        np.ones({table_bytes // 4}, np.float32)
    """)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "MemoryError" in refused.stderr
    full = load_full_tables(BIG, path).embedding_bags["loc"].weight.numpy()
    assert np.array_equal(parquet_table(out), full)
