"""The tables of a `save_sharded` checkpoint as Parquet, one block of rows at a time.

A save_sharded checkpoint (embeddings/checkpoint.py) keeps each table as DCP shards in
safetensors files: every file's header lists its tensors, and its `DCP_SHARDING_INFO` metadata
gives each shard's offset (row, column) in the full table. Table-wise shards cover whole
tables, column-wise ones a range of columns of every row, row-wise ones a range of rows.

`write_table_parquet` writes one table as (row, vector) rows, in blocks of rows: for each
block it reads, from every shard that covers part of it, only those rows (safetensors maps
the file and copies the slice), so the process holds one block [block_rows, dim] and never the
table. Only numpy, pyarrow and safetensors are imported: no torch, no process group.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open

from umask.bundle_format import table_schema
from umask.errors import UserError

BLOCK_ROWS = 1 << 16  # rows per block and Parquet row group (16 MB at 64 float32 columns)


def weight_key(table: str) -> str:
    """The tensor name of a table's weights in a save_sharded checkpoint (ShardedTables'
    state dict: the EmbeddingBagCollection under `tables.`)."""
    return f"tables.embedding_bags.{table}.weight"


@dataclass(frozen=True)
class Shard:
    """One saved piece of a table: rows [row, row + rows) x columns [col, col + cols)."""
    file: Path
    row: int
    col: int
    rows: int
    cols: int


def table_shards(folder: str | Path, table: str) -> list[Shard]:
    """Every shard of `table` in a save_sharded checkpoint folder, read from the files'
    headers (JSON) only; a UserError naming the file when a header cannot be read."""
    key = weight_key(table)
    shards = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        header = _header(path)
        if key not in header:
            continue
        try:
            offsets = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])[key]["saved_offsets"]
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: no DCP shard offset for {key} ({err!r}); not a save_sharded file") from None
        rows, cols = header[key]["shape"]
        shards.append(Shard(path, int(offsets[0]), int(offsets[1]), int(rows), int(cols)))
    if not shards:
        raise UserError(f"{folder}: no shard of table {table!r} ({key}) in any *.safetensors file")
    return shards


def write_table_parquet(folder: str | Path, table: str, rows: int, dim: int, out: str | Path,
                        block_rows: int = BLOCK_ROWS) -> None:
    """Writes table `table` (rows x dim float32, from the save_sharded checkpoint in `folder`)
    to `out` as umask.bundle.table_schema(dim) rows 0..rows-1, one row group per block.

    Every cell must be covered by a shard: a UserError names the first row and column that
    is not, and a shard reaching past rows x dim. Memory: one block of block_rows x dim.
    """
    shards = table_shards(folder, table)
    for shard in shards:
        if shard.row + shard.rows > rows or shard.col + shard.cols > dim:
            raise UserError(f"{shard.file}: a shard of {table!r} covers rows {shard.row}..{shard.row + shard.rows - 1}, "
                            f"columns {shard.col}..{shard.col + shard.cols - 1}, outside the configured "
                            f"{rows} x {dim} table")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(out, table_schema(dim), compression="zstd") as writer:
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            block = np.empty((stop - start, dim), np.float32)
            covered = np.zeros((stop - start, dim), bool)
            for shard in shards:
                lo, hi = max(start, shard.row), min(stop, shard.row + shard.rows)
                if lo >= hi:
                    continue
                with safe_open(str(shard.file), framework="np") as f:
                    part = f.get_slice(weight_key(table))[lo - shard.row:hi - shard.row]
                cols = slice(shard.col, shard.col + shard.cols)
                block[lo - start:hi - start, cols] = part
                covered[lo - start:hi - start, cols] = True
            if not covered.all():
                r, c = np.argwhere(~covered)[0]
                raise UserError(f"{folder}: row {start + r}, column {c} of table {table!r} is in no shard; "
                                "the checkpoint's tables are incomplete")
            writer.write_table(pa.table({
                "row": np.arange(start, stop, dtype=np.int64),
                "vector": pa.FixedSizeListArray.from_arrays(block.reshape(-1), dim)}, schema=table_schema(dim)))


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(length))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
