"""The training data loader: per-rank, disjoint, deterministic, resumable batches of examples.

Input is the featurize output: `<features>/split=<name>/shard=<n>/part-<n>.parquet` files in the
EXAMPLES schema, split-homogeneous so a split is chosen by path and every count comes from
Parquet footers, plus `<features>/spec/` (umask/spec.py) for T (`slots`) and F (`channels`).

How an epoch is cut, from footers alone and identically on every rank (no communication):
1. The unit of work is one row group. A permutation seeded by (seed, epoch) orders all row
   groups of the chosen splits; each in turn goes to the rank holding the fewest examples so
   far, so ranks get equal numbers of examples as nearly as row-group sizes allow.
2. Every rank yields the same number of batches, min over ranks of (its examples // batch_size),
   because ranks with different batch counts hang in collective ops; the rest is dropped.
3. A rank reads its row groups in dealt order, `shuffle_window` at a time; the rows of a window
   are permuted with a seed of (seed, epoch, rank, window) and batches are cut from the stream
   of windows, a batch spanning two windows where it falls on the border.

Resuming: `state_dict()` records (epoch, batches yielded in the epoch). The next batch starts at
row batches*batch_size of the rank's stream, so `load_state_dict` reads only the window holding
that row, never the earlier ones. A checkpoint is bound to its batch size, splits, shuffle
settings and dataset; resuming with any of them changed is a UserError, since the position
would then name other examples (start a new run to change them).

Resuming at another world size (`load_resharded_state`): an epoch's deal is per world size, so
the examples N ranks had not yet read of an epoch are not a position in M ranks' deal of it.
They are dealt anew instead, exactly: the rest of each saved rank's stream (from its next
batch to the end of its epoch) is laid end to end in rank order, and the M ranks take equal
contiguous slices of whole batches of it (`Bridge`), read in the saved streams' own order
(their windows and row permutations). Then the next epoch starts, dealt for M. Nothing is read
twice; what does not fill a batch on every rank (fewer than M * batch_size examples) is left
out, and `load_resharded_state` returns how many (the driver's log says it). A checkpoint
taken inside such a bridge records the chain of (world size, batches read) that made it, so
it resumes at its own world size or reshards again, exactly alike. A bridge reads without
prefetch: it lasts at most one epoch.

Reading: only the EXAMPLES columns, lists decoded through their offsets and flat values (no
per-row Python), one window prefetched in a background thread so I/O overlaps the step.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.config import DataConfig
from trainer.data.batch import Batch
from trainer.data.schema import EXAMPLES
from umask.spec import SPEC_DIR
from umask.slots import ExampleRows
from umask.spec import SPLITS, FeatureSpec, load_spec
from umask.errors import UserError

# SeedSequence entropy prefixes, so the row-group deal and the row shuffles never share a stream
_DEAL_STREAM = 0
_ROW_STREAM = 1


@dataclass(frozen=True)
class ExampleFile:
    path: Path
    split: str
    metadata: pq.FileMetaData  # footer, parsed once at discovery and reused for every read


class RowGroupRef(NamedTuple):
    file: int  # index into the loader's file list
    row_group: int
    num_rows: int


@dataclass(frozen=True)
class EpochPlan:
    """One rank's share of one epoch: windows of row groups and where each starts in its stream."""

    windows: list[list[RowGroupRef]]
    window_starts: np.ndarray  # [len(windows) + 1] row offset of each window in the rank's stream
    num_batches: int  # the same on every rank
    smallest_share: int  # rows of the rank with fewest: num_batches * batch_size or a little more


Segment = tuple[int, int, int]  # (rank of the epoch's first deal, start row, end row) of its stream


@dataclass(frozen=True)
class Bridge:
    """The rest of an interrupted epoch, dealt to this world (see the module docstring).

    chain: [(world size, batches each rank had read)], the first deal's, then each bridge's
    that was itself interrupted; segments: this rank's slice, as rows of the first deal's
    streams in reading order; num_batches: the same on every rank; left_out: the examples of
    the epoch's rest that the last deal leaves out (they fill no batch on every rank)."""

    epoch: int
    chain: tuple[tuple[int, int], ...]
    segments: tuple[Segment, ...]
    num_batches: int
    left_out: int


def _slice_segments(segments: list[Segment], start: int, end: int) -> list[Segment]:
    """Rows [start, end) of the stream that is `segments` laid end to end."""
    out, position = [], 0
    for rank, lo, hi in segments:
        a, b = max(start, position), min(end, position + hi - lo)
        if a < b:
            out.append((rank, lo + a - position, lo + b - position))
        position += hi - lo
    return out


def _rows(segments: list[Segment]) -> int:
    return sum(hi - lo for _, lo, hi in segments)


def _chain(state: dict) -> list[tuple[int, int]]:
    """The saved bridge chain of a loader state ([] outside a bridge), checked."""
    chain = state.get("bridge", [])
    if not isinstance(chain, list) or not all(
            isinstance(c, list) and len(c) == 2 and all(isinstance(v, int) and v >= 0 for v in c) for c in chain):
        raise UserError(f"loader state: key 'bridge' must be a list of [world_size, batches], found {chain!r}")
    return [tuple(c) for c in chain]


def load_manifest(features_dir: Path) -> dict:
    """The featurize manifest of `features_dir`, as a dict; a UserError if it is missing or not JSON."""
    path = Path(features_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; is {features_dir} the output of `u-mask data featurize`?") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    return manifest


def read_spec(features_dir: Path) -> FeatureSpec:
    """The feature spec of a featurize output (`<features>/spec/`), checked against the
    manifest's spec_digest so that examples and spec come from the same run."""
    manifest = load_manifest(features_dir)
    spec = load_spec(Path(features_dir) / SPEC_DIR)
    if manifest.get("spec_digest") != spec.digest:
        raise UserError(f"{Path(features_dir) / 'manifest.json'}: spec_digest "
                        f"{manifest.get('spec_digest')!r} is not the digest of {SPEC_DIR}/spec.json "
                        f"({spec.digest}); the folder mixes the output of two featurize runs")
    return spec


def check_spec_matches(spec: FeatureSpec, data: DataConfig, features_dir: str | Path) -> None:
    """Refuses, in one line naming each key, features whose spec disagrees with the run's data.*
    (umask.spec.CONFIG_KEYS): the model would read one channel as another, or slots as hours."""
    mismatches = spec.mismatches(dataclasses.asdict(data))
    if mismatches:
        raise UserError(f"{features_dir}: the features were made with other data settings than this "
                        f"config's: data.{'; data.'.join(mismatches)}; featurize again with this config, "
                        "or set these keys to the features' values")


def _check_schema(path: Path, schema: pa.Schema) -> None:
    for field in EXAMPLES:
        index = schema.get_field_index(field.name)
        if index < 0:
            raise UserError(f"{path}: column '{field.name}' is missing (EXAMPLES schema expected)")
        found = schema.field(index).type
        if field.name == "split":
            ok = pa.types.is_string(found) or pa.types.is_large_string(found) or (
                pa.types.is_dictionary(found) and pa.types.is_string(found.value_type))
        else:
            ok = found == field.type
        if not ok:
            raise UserError(f"{path}: column '{field.name}' has type {found}, expected {field.type}")


def discover(features_dir: Path, splits: tuple[str, ...]) -> list[ExampleFile]:
    """The Parquet files of `splits`, in a stable order, with footers read and schemas checked."""
    if not features_dir.is_dir():
        raise UserError(f"{features_dir}: no such folder; run `u-mask data featurize` first")
    files = []
    for split in splits:
        split_dir = features_dir / f"split={split}"
        paths = sorted(split_dir.glob("shard=*/*.parquet"))
        if not paths:
            raise UserError(f"{split_dir}: no shard=*/part-*.parquet files, so split '{split}' has no examples")
        for path in paths:
            try:
                parquet = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as err:
                raise UserError(f"{path}: not a readable Parquet file ({err})") from None
            _check_schema(path, parquet.schema_arrow)
            files.append(ExampleFile(path, split, parquet.metadata))
    return files


def deal_row_groups(sizes: np.ndarray, order: np.ndarray, world_size: int) -> list[list[int]]:
    """Row-group indices per rank: each of `order` in turn to the rank with fewest rows so far."""
    loads = [(0, rank) for rank in range(world_size)]  # (rows, rank): ties go to the lower rank
    dealt: list[list[int]] = [[] for _ in range(world_size)]
    for index in order:
        rows, rank = heapq.heappop(loads)
        dealt[rank].append(int(index))
        heapq.heappush(loads, (rows + int(sizes[index]), rank))
    return dealt


def _batches_per_rank(sizes_and_order: tuple[np.ndarray, np.ndarray], world_size: int, batch_size: int) -> int:
    """The batches every rank yields in an epoch dealt over `world_size` ranks (step 2 of the scheme)."""
    sizes, order = sizes_and_order
    return min(int(sizes[d].sum()) for d in deal_row_groups(sizes, order, world_size)) // batch_size


def _list_column(table: pa.Table, name: str, per_row: int | np.ndarray, where: str) -> pa.Array:
    """The flat values of list column `name`, after checking every row holds `per_row` values."""
    column = table.column(name).combine_chunks()
    if column.null_count or column.flatten().null_count:
        raise UserError(f"{where}: column '{name}' holds nulls")
    offsets = column.offsets.to_numpy()
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != per_row)
    if bad.size:
        row = int(bad[0])
        expected = per_row if np.isscalar(per_row) else int(per_row[row])
        raise UserError(f"{where}, row {row}: column '{name}' has {int(lengths[row])} values, expected {expected}")
    return column.flatten()


def read_row_group(file: ExampleFile, row_group: int, slots: int, channels: int) -> ExampleRows:
    """One row group as ExampleRows, validated against T=slots and F=channels."""
    where = f"{file.path}: row group {row_group}"
    try:
        table = pq.ParquetFile(file.path, metadata=file.metadata).read_row_group(
            row_group, columns=EXAMPLES.names)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{where}: cannot be read ({err})") from None
    n = table.num_rows
    for name in ("user_id", "split", "window_start"):
        if table.column(name).null_count:
            raise UserError(f"{where}: column '{name}' holds nulls")
    wrong_split = pc.not_equal(table.column("split").cast(pa.string()), file.split)
    if pc.any(wrong_split).as_py():
        row = int(np.flatnonzero(wrong_split.to_numpy())[0])
        raise UserError(f"{where}, row {row}: split is '{table.column('split')[row]}' in a split={file.split} folder")

    def bags(values: str, lengths_name: str) -> tuple[np.ndarray, np.ndarray]:
        lengths = _list_column(table, lengths_name, slots, where).to_numpy().reshape(n, slots)
        if (lengths < 0).any():
            row = int(np.flatnonzero((lengths < 0).any(axis=1))[0])
            raise UserError(f"{where}, row {row}: column '{lengths_name}' has a negative length")
        flat = _list_column(table, values, lengths.sum(axis=1), where)
        return flat.to_numpy(), lengths

    app_values, app_lengths = bags("app_ids", "app_lengths")
    loc_values, loc_lengths = bags("loc_ids", "loc_lengths")
    return ExampleRows(
        user_id=table.column("user_id").to_numpy(),
        window_start=table.column("window_start").to_numpy(),
        split=np.full(n, SPLITS.index(file.split), dtype=np.int64),
        time_of_week=_list_column(table, "time_of_week", slots, where).to_numpy().reshape(n, slots),
        observed=_list_column(table, "observed", slots, where).to_numpy(zero_copy_only=False).reshape(n, slots),
        dense=_list_column(table, "dense", slots * channels, where).to_numpy().reshape(n, slots, channels),
        app_values=app_values,
        app_lengths=app_lengths,
        loc_values=loc_values,
        loc_lengths=loc_lengths,
    )


class ShardedLoader:
    """Iterator of Batch for one rank of `world_size`; see the module docstring for the scheme.

    epochs: None streams forever; an int stops after that many epochs. shuffle=False keeps file
    order and row order (every epoch the same), for evaluation. shuffle_window: row groups whose
    rows are shuffled together (memory: two windows of examples are held, one being prefetched).
    """

    def __init__(self, features_dir: str | Path, rank: int, world_size: int, batch_size: int, seed: int,
                 splits: tuple[str, ...] | list[str] = ("train",), epochs: Optional[int] = None,
                 shuffle: bool = True, shuffle_window: int = 4, prefetch: bool = True):
        splits = tuple(splits)
        for name, value in (("world_size", world_size), ("batch_size", batch_size),
                            ("shuffle_window", shuffle_window)):
            if value <= 0:
                raise UserError(f"loader: {name} must be positive, got {value}")
        if not 0 <= rank < world_size:
            raise UserError(f"loader: rank {rank} is outside a world of {world_size}")
        if seed < 0:
            raise UserError(f"loader: seed must be >= 0, got {seed}")
        if epochs is not None and epochs <= 0:
            raise UserError(f"loader: epochs must be positive or None (forever), got {epochs}")
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise UserError(f"loader: splits must be a non-empty subset of {SPLITS}, got {splits}")
        self.features_dir = Path(features_dir)
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.splits, self.epochs, self.shuffle, self.shuffle_window = splits, epochs, shuffle, shuffle_window
        self.files = discover(self.features_dir, splits)
        self.spec = read_spec(self.features_dir)
        self.slots, self.channels = self.spec.slots, self.spec.layout.num_channels
        self.row_groups = [RowGroupRef(f, g, file.metadata.row_group(g).num_rows)
                           for f, file in enumerate(self.files)
                           for g in range(file.metadata.num_row_groups)
                           if file.metadata.row_group(g).num_rows > 0]
        self.num_examples = sum(ref.num_rows for ref in self.row_groups)
        self._plans: dict[int, EpochPlan] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"loader-rank{rank}") if prefetch else None
        self._pending: Optional[tuple[tuple[int, int], Future]] = None
        self._epoch = 0
        self._batch = 0  # batches yielded in self._epoch
        self._block: Optional[ExampleRows] = None  # the current window, in file order
        self._order = np.empty(0, dtype=np.int64)  # the window's rows in the order they are yielded
        self._cursor = 0  # next position in self._order
        self._bridge_now: Optional[Bridge] = None  # the rest of an epoch resharded to this world
        self._stream_plans: dict[int, EpochPlan] = {}  # the bridge's first deal, by rank
        self._bridge_window = None  # ((rank, window), rows, order): the window a bridge reads
        self.plan(0)  # fail now, not at the first batch, when the data cannot fill a batch

    # ---- the epoch plan -------------------------------------------------------------------

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's share of `epoch` (cached for the current and next epoch)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = self._make_plan(epoch)
        return self._plans[epoch]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return self.plan(epoch).num_batches

    def _make_plan(self, epoch: int) -> EpochPlan:
        plan = self._stream_plan(epoch, self.world_size, self.rank)
        if plan.num_batches == 0:
            sizes, _ = self._deal_inputs(epoch)
            raise UserError(
                f"{self.features_dir}: splits {list(self.splits)} hold {self.num_examples} examples in "
                f"{len(sizes)} row groups; dealt to {self.world_size} ranks the smallest share is "
                f"{plan.smallest_share} examples, less than one batch of {self.batch_size}: use a smaller "
                f"batch size, fewer workers or smaller row groups")
        return plan

    def _stream_plan(self, epoch: int, world_size: int, rank: int) -> EpochPlan:
        """Rank `rank`'s share of `epoch` dealt over `world_size` ranks."""
        sizes, order = self._deal_inputs(epoch)
        dealt = deal_row_groups(sizes, order, world_size)
        rank_rows = [int(sizes[d].sum()) for d in dealt]
        mine = [self.row_groups[i] for i in dealt[rank]]
        windows = [mine[i:i + self.shuffle_window] for i in range(0, len(mine), self.shuffle_window)]
        starts = np.zeros(len(windows) + 1, dtype=np.int64)
        np.cumsum([sum(ref.num_rows for ref in w) for w in windows], out=starts[1:])
        return EpochPlan(windows, starts, min(rank_rows) // self.batch_size, min(rank_rows))

    def _bridge(self, epoch: int, chain: list[tuple[int, int]]) -> Bridge:
        """This rank's Bridge over the rest of `epoch` after `chain` (module docstring)."""
        first_world, _ = chain[0]
        per_rank = self._stream_plan(epoch, first_world, 0).num_batches * self.batch_size
        streams = [[(rank, 0, per_rank)] for rank in range(first_world)]
        for index, (world, batches) in enumerate(chain):
            if not 0 <= batches * self.batch_size <= _rows(streams[0]):
                raise UserError(f"loader state: batches_in_epoch={batches} but epoch {epoch} has "
                                f"{_rows(streams[0]) // self.batch_size} batches at the {world} ranks that saved it")
            rest = [seg for stream in streams for seg in _slice_segments(stream, batches * self.batch_size,
                                                                          _rows(stream))]
            next_world = chain[index + 1][0] if index + 1 < len(chain) else self.world_size
            share = _rows(rest) // (next_world * self.batch_size) * self.batch_size
            left_out = _rows(rest) - share * next_world
            streams = [_slice_segments(rest, m * share, (m + 1) * share) for m in range(next_world)]
        return Bridge(epoch, tuple(tuple(c) for c in chain), tuple(streams[self.rank]),
                      _rows(streams[self.rank]) // self.batch_size, left_out)

    def _bridge_batch(self, bridge: Bridge, batch: int) -> ExampleRows:
        """Rows [batch * B, (batch + 1) * B) of this rank's bridge, read from the first deal's
        streams (one window held at a time)."""
        parts = []
        for rank, lo, hi in _slice_segments(list(bridge.segments), batch * self.batch_size,
                                            (batch + 1) * self.batch_size):
            plan = self._stream_plans.setdefault(rank, self._stream_plan(bridge.epoch, bridge.chain[0][0], rank))
            while lo < hi:
                window = int(np.searchsorted(plan.window_starts, lo, side="right")) - 1
                key = (rank, window)
                if self._bridge_window is None or self._bridge_window[0] != key:
                    self._bridge_window = key, *self._read_window(bridge.epoch, window, plan.windows[window], rank)
                _, block, order = self._bridge_window
                start = lo - int(plan.window_starts[window])
                take = min(hi - lo, len(order) - start)
                parts.append(block.take(order[start:start + take]))
                lo += take
        return ExampleRows.concat(parts)

    # ---- reading windows ------------------------------------------------------------------

    def _read_window(self, epoch: int, window: int, refs: list[RowGroupRef],
                     rank: Optional[int] = None) -> tuple[ExampleRows, np.ndarray]:
        """The window's rows and their yield order. Runs in the prefetch thread too, so it gets its
        row groups passed in rather than reading self._plans. The rows stay in file order: each
        batch gathers its own rows, which copies every example once instead of twice."""
        rows = ExampleRows.concat([read_row_group(self.files[ref.file], ref.row_group, self.slots, self.channels)
                                   for ref in refs])
        if not self.shuffle:
            return rows, np.arange(len(rows))
        rng = np.random.default_rng([_ROW_STREAM, self.seed, epoch, self.rank if rank is None else rank, window])
        return rows, rng.permutation(len(rows))

    def _successor(self, epoch: int, window: int) -> Optional[tuple[int, int]]:
        """The window read after (epoch, window), or None at the end of the last epoch."""
        plan = self.plan(epoch)
        if window + 1 < len(plan.windows) and plan.window_starts[window + 1] < plan.num_batches * self.batch_size:
            return epoch, window + 1
        if self.epochs is not None and epoch + 1 >= self.epochs:
            return None
        return epoch + 1, 0

    def _enter_window(self, epoch: int, position: int) -> None:
        """Make the window holding row `position` of the rank's stream current, and prefetch the next."""
        plan = self.plan(epoch)
        window = int(np.searchsorted(plan.window_starts, position, side="right")) - 1
        if self._pending is not None and self._pending[0] == (epoch, window):
            self._block, self._order = self._pending[1].result()
        else:
            self._block, self._order = self._read_window(epoch, window, plan.windows[window])
        self._pending = None
        self._cursor = position - int(plan.window_starts[window])
        successor = self._successor(epoch, window)
        if self._executor is not None and successor is not None:
            refs = self.plan(successor[0]).windows[successor[1]]
            self._pending = successor, self._executor.submit(self._read_window, *successor, refs)

    # ---- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        bridge = self._bridge_now
        if bridge is not None and self._epoch == bridge.epoch:
            if self._batch < bridge.num_batches:
                self._batch += 1
                return Batch.of_rows(self._bridge_batch(bridge, self._batch - 1))
            self._epoch, self._batch = self._epoch + 1, 0
            self._bridge_now, self._stream_plans, self._bridge_window = None, {}, None
        while True:
            if self.epochs is not None and self._epoch >= self.epochs:
                raise StopIteration
            if self._batch < self.plan(self._epoch).num_batches:
                break
            self._epoch, self._batch, self._block = self._epoch + 1, 0, None
        position = self._batch * self.batch_size
        parts = []
        while position < (self._batch + 1) * self.batch_size:
            if self._block is None or self._cursor == len(self._order):
                self._enter_window(self._epoch, position)
            take = min((self._batch + 1) * self.batch_size - position, len(self._order) - self._cursor)
            parts.append(self._block.take(self._order[self._cursor:self._cursor + take]))
            self._cursor += take
            position += take
        self._batch += 1
        return Batch.of_rows(ExampleRows.concat(parts))

    # ---- resuming -------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What a saved position is only valid for."""
        return {"seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                "batch_size": self.batch_size, "splits": list(self.splits), "shuffle": self.shuffle,
                "shuffle_window": self.shuffle_window, "row_groups": len(self.row_groups),
                "examples": self.num_examples, "spec_digest": self.spec.digest}

    def state_dict(self) -> dict:
        """JSON-able position: the next batch is batch `batches_in_epoch` of `epoch` (of the
        bridge `bridge` names, when the epoch was resharded to this world)."""
        bridge = {"bridge": [list(c) for c in self._bridge_now.chain]} if self._bridge_now is not None else {}
        return {"epoch": self._epoch, "batches_in_epoch": self._batch, **bridge, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ())
        epoch, batches = state["epoch"], state["batches_in_epoch"]
        bridge = self._bridge(epoch, _chain(state)) if "bridge" in state else None
        available = bridge.num_batches if bridge is not None else self.plan(epoch).num_batches
        if batches > available:
            raise UserError(f"loader state: batches_in_epoch={batches} but epoch {epoch} has {available} batches")
        self._go_to(epoch, batches, bridge)

    def load_resharded_state(self, state: dict) -> int:
        """Continues a position saved by a loader of another world size (any saved rank's state:
        they are the same but for rank) by the module docstring's rule: the rest of the saved
        epoch dealt exactly to this world, then the next epoch. Returns how many of the rest's
        examples are left out (fewer than world_size * batch_size per reshard; 0 on a boundary).
        UserError when any other setting of the position differs, as in load_state_dict."""
        self._check_state(state, ("world_size", "rank"))
        epoch, batches = state["epoch"], state["batches_in_epoch"]
        if batches == 0 and "bridge" not in state:  # a boundary: the epoch dealt for this world
            self._go_to(epoch, 0, None)
            return 0
        bridge = self._bridge(epoch, _chain(state) + [(state["world_size"], batches)])
        if bridge.num_batches == 0:  # nothing left that fills a batch on every rank
            self._go_to(epoch + 1, 0, None)
        else:
            self._go_to(epoch, 0, bridge)
        return bridge.left_out

    def _check_state(self, state: dict, free: tuple[str, ...]) -> None:
        """UserError unless state names this loader's examples, the keys in `free` aside."""
        for key, current in self._identity().items():
            if key in free:
                continue
            if key not in state:
                raise UserError(f"loader state: key '{key}' is missing")
            if state[key] != current:
                raise UserError(
                    f"loader state: saved with {key}={state[key]!r} but this run has {key}={current!r}; "
                    f"the saved position would name other examples, so resume with the same {key} "
                    f"(and dataset) or start a new run")
        for key in ("epoch", "batches_in_epoch", "world_size"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise UserError(f"loader state: key '{key}' must be an integer >= 0, found {state.get(key)!r}")

    def _go_to(self, epoch: int, batches: int, bridge: Optional[Bridge]) -> None:
        self._epoch, self._batch, self._bridge_now = epoch, batches, bridge
        self._block, self._pending, self._stream_plans, self._bridge_window = None, None, {}, None

    def _deal_inputs(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows per row group, the epoch's deal order of them), as _make_plan uses them."""
        sizes = np.array([ref.num_rows for ref in self.row_groups], dtype=np.int64)
        if self.shuffle:
            return sizes, np.random.default_rng([_DEAL_STREAM, self.seed, epoch]).permutation(len(sizes))
        return sizes, np.arange(len(sizes))

    # ---- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the prefetch thread; reads after this, if any, happen in the caller's thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending = None

    def __enter__(self) -> "ShardedLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
