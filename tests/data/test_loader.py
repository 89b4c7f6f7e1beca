"""ShardedLoader on small real Parquet datasets written here in the featurize layout."""
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import trainer.data.loader as loader_module
from trainer.data.batch import Batch
from trainer.data.loader import ShardedLoader, deal_row_groups
from trainer.data.schema import EXAMPLES
from umask.slots import gather_bags
from umask.spec import SPLITS, FeatureMaps, FeatureSpec, save_spec
from umask.errors import UserError

T, C, K = 4, 1, 1
F = C + K + 4  # umask.spec.DenseLayout


def example_row(user: int, split: str, slots: int = T, channels: int = F) -> dict:
    """A synthetic example whose every value can be recomputed from the user id."""
    observed = [(user + t) % 3 == 0 for t in range(slots)]
    app_lengths = [1 + user % 2 if o else 0 for o in observed]
    loc_lengths = [1 if o else 0 for o in observed]
    return {
        "user_id": user,
        "split": split,
        "window_start": 1_000_000 + user,
        "time_of_week": [(user + t) % 168 for t in range(slots)],
        "observed": observed,
        "dense": [float(user) + 0.25 * i for i in range(slots * channels)],
        "app_ids": [user * 100 + t for t in range(slots) for _ in range(app_lengths[t])],
        "app_lengths": app_lengths,
        "loc_ids": [7000 + user for t in range(slots) if observed[t]],
        "loc_lengths": loc_lengths,
    }


def write_part(features: Path, split: str, shard: int, groups: list[list[dict]],
               schema: pa.Schema = EXAMPLES) -> Path:
    """One part file with one row group per entry of `groups`."""
    path = features / f"split={split}" / f"shard={shard:05d}" / "part-00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        for rows in groups:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return path


def write_manifest(features: Path, slots: int = T) -> None:
    """The spec folder and a manifest that names it, as featurize writes them."""
    spec = save_spec(features / "spec", FeatureSpec(slot_seconds=3600, slots=slots, num_categories=C,
                                                   num_regions=K), FeatureMaps.empty())
    (features / "manifest.json").write_text(json.dumps({"spec_digest": spec.digest}))


def write_dataset(features: Path, group_sizes: list[list[int]], split: str = "train", first_user: int = 0) -> list[int]:
    """Shard s holds row groups of group_sizes[s] rows; users are numbered consecutively."""
    write_manifest(features)
    user = first_user
    for shard, sizes in enumerate(group_sizes):
        groups = []
        for size in sizes:
            groups.append([example_row(u, split) for u in range(user, user + size)])
            user += size
        write_part(features, split, shard, groups)
    return list(range(first_user, user))


UNEVEN = [[5, 3, 7, 2], [6, 4, 1, 8]]  # 36 examples in 8 row groups of different sizes


def collect(loader) -> list[Batch]:
    with loader:
        return list(loader)


def assert_batches_equal(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in Batch.__dataclass_fields__:
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), name


def users(batches: list[Batch]) -> list[int]:
    return [u for b in batches for u in b.user_id.tolist()]


def test_batch_holds_the_source_values_in_kjt_layout(tmp_path):
    write_manifest(tmp_path, slots=3)
    rows = [example_row(4, "train", 3), example_row(5, "train", 3)]
    write_part(tmp_path, "train", 0, [rows])
    [batch] = collect(ShardedLoader(tmp_path, 0, 1, batch_size=2, seed=0, epochs=1, shuffle=False))
    # user 4: observed slots t with (4+t)%3==0 -> t=2, 1 app id; user 5: t=1, 2 app ids
    assert batch.user_id.tolist() == [4, 5] and batch.user_id.dtype == torch.int64
    assert batch.window_start.tolist() == [1_000_004, 1_000_005]
    assert batch.split.tolist() == [SPLITS.index("train")] * 2
    assert batch.time_of_week.tolist() == [[4, 5, 6], [5, 6, 7]] and batch.time_of_week.dtype == torch.int64
    assert batch.observed.tolist() == [[False, False, True], [False, True, False]]
    assert batch.dense.shape == (2, 3, 6) and batch.dense.dtype == torch.float32
    assert batch.dense[0, 0].tolist() == [4.0, 4.25, 4.5, 4.75, 5.0, 5.25]
    assert batch.dense[1, 2].tolist() == [8.0, 8.25, 8.5, 8.75, 9.0, 9.25]
    assert batch.app_lengths.tolist() == [0, 0, 1, 0, 2, 0] and batch.app_lengths.dtype == torch.int32
    assert batch.app_values.tolist() == [402, 501, 501]
    assert batch.loc_lengths.tolist() == [0, 0, 1, 0, 1, 0]
    assert batch.loc_values.tolist() == [7004, 7005]
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.dense, batch.dense)


def test_shuffled_bags_stay_with_their_rows(tmp_path):
    write_dataset(tmp_path, UNEVEN)
    for batch in collect(ShardedLoader(tmp_path, 0, 1, batch_size=4, seed=3, epochs=1, shuffle_window=2)):
        app_at, loc_at = 0, 0
        lengths = batch.app_lengths.view(len(batch), T)
        loc_lengths = batch.loc_lengths.view(len(batch), T)
        for i, user in enumerate(batch.user_id.tolist()):
            expected = example_row(user, "train")
            assert batch.observed[i].tolist() == expected["observed"]
            assert batch.dense[i].flatten().tolist() == expected["dense"]
            assert lengths[i].tolist() == expected["app_lengths"]
            n = len(expected["app_ids"])
            assert batch.app_values[app_at:app_at + n].tolist() == expected["app_ids"]
            app_at += n
            assert loc_lengths[i].tolist() == expected["loc_lengths"]
            n = len(expected["loc_ids"])
            assert batch.loc_values[loc_at:loc_at + n].tolist() == expected["loc_ids"]
            loc_at += n
        assert app_at == len(batch.app_values) and loc_at == len(batch.loc_values)


def test_deal_gives_each_row_group_to_the_least_loaded_rank():
    sizes = np.array([5, 3, 7, 2, 6, 4, 1, 8])
    # loads after each step: (5,0,0) (5,3,0) (5,3,7) (5,5,7) (11,5,7) (11,9,7) (11,9,8) (11,9,16)
    assert deal_row_groups(sizes, np.arange(8), 3) == [[0, 4], [1, 3, 5], [2, 6, 7]]


def test_unshuffled_ranks_get_the_dealt_row_groups_and_equal_batch_counts(tmp_path):
    write_dataset(tmp_path, UNEVEN)
    per_rank = [users(collect(ShardedLoader(tmp_path, r, 3, batch_size=2, seed=0, epochs=1, shuffle=False)))
                for r in range(3)]
    # rank shares 11, 9 and 16 examples (see the deal test): min 9 // 2 = 4 batches each
    assert [len(u) for u in per_rank] == [8, 8, 8]
    assert per_rank[0] == [0, 1, 2, 3, 4, 17, 18, 19]  # row groups 0 (users 0-4) and 4 (users 17-22)
    assert per_rank[1] == [5, 6, 7, 15, 16, 23, 24, 25]  # row groups 1, 3 and 5
    assert per_rank[2] == [8, 9, 10, 11, 12, 13, 14, 27]  # row groups 2 and 6


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_shuffled_ranks_are_disjoint_with_equal_batch_counts(tmp_path, world_size, seed):
    everyone = write_dataset(tmp_path, UNEVEN)
    per_rank = [collect(ShardedLoader(tmp_path, r, world_size, batch_size=2, seed=seed, epochs=1, shuffle_window=2))
                for r in range(world_size)]
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1 and counts.pop() > 0
    seen = [u for batches in per_rank for u in users(batches)]
    assert len(seen) == len(set(seen))  # disjoint, and no example twice within a rank
    assert set(seen) <= set(everyone)
    if world_size == 1:
        assert sorted(seen) == everyone  # 36 examples, batch 2: nothing dropped


def test_same_seed_same_stream_other_seed_other_order(tmp_path):
    write_dataset(tmp_path, UNEVEN)
    make = lambda seed, prefetch=True: ShardedLoader(tmp_path, 1, 2, batch_size=3, seed=seed, epochs=2,
                                                     shuffle_window=2, prefetch=prefetch)
    first = collect(make(5))
    assert_batches_equal(first, collect(make(5)))
    assert_batches_equal(first, collect(make(5, prefetch=False)))
    assert users(first) != users(collect(make(6)))


def test_epochs_come_in_different_orders(tmp_path):
    everyone = write_dataset(tmp_path, UNEVEN)
    loader = ShardedLoader(tmp_path, 0, 1, batch_size=4, seed=0, epochs=2, shuffle_window=2)
    per_epoch = loader.batches_per_epoch(0)
    stream = users(collect(loader))
    epoch0, epoch1 = stream[:per_epoch * 4], stream[per_epoch * 4:]
    assert sorted(epoch0) == sorted(epoch1) == everyone
    assert epoch0 != epoch1


def test_unshuffled_epochs_repeat(tmp_path):
    everyone = write_dataset(tmp_path, UNEVEN)
    stream = users(collect(ShardedLoader(tmp_path, 0, 1, batch_size=4, seed=0, epochs=2, shuffle=False)))
    assert stream == everyone + everyone


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_resume_at_every_position_is_bit_identical(tmp_path, world_size, rank):
    write_dataset(tmp_path, UNEVEN)
    make = lambda: ShardedLoader(tmp_path, rank, world_size, batch_size=3, seed=11, epochs=2, shuffle_window=2)
    uninterrupted = make()
    states, reference = [uninterrupted.state_dict()], []
    for batch in uninterrupted:
        reference.append(batch)
        states.append(json.loads(json.dumps(uninterrupted.state_dict())))
    uninterrupted.close()
    assert len(reference) >= 6
    for position, state in enumerate(states):
        resumed = make()
        resumed.load_state_dict(state)
        assert_batches_equal(collect(resumed), reference[position:])


def test_resume_reads_only_the_window_of_the_next_batch(tmp_path, monkeypatch):
    write_dataset(tmp_path, UNEVEN)
    reads = []
    real_read = loader_module.read_row_group
    monkeypatch.setattr(loader_module, "read_row_group",
                        lambda file, group, *sizes: reads.append((file.path, group)) or real_read(file, group, *sizes))
    loader = ShardedLoader(tmp_path, 0, 1, batch_size=2, seed=0, epochs=1, shuffle_window=2, prefetch=False)
    last = loader.batches_per_epoch() - 1
    loader.load_state_dict({**loader.state_dict(), "batches_in_epoch": last})
    next(loader)
    # the last batch lies in the last window, of at most 2 of the 8 row groups
    assert 1 <= len(reads) <= 2
    with pytest.raises(StopIteration):
        next(loader)


def test_split_filtering_by_folder(tmp_path):
    train = write_dataset(tmp_path, [[4, 4]], split="train")
    val = write_dataset(tmp_path, [[3, 3]], split="val", first_user=100)
    only_val = collect(ShardedLoader(tmp_path, 0, 1, batch_size=2, seed=0, epochs=1, splits=("val",)))
    assert sorted(users(only_val)) == val
    assert all(b.split.tolist() == [SPLITS.index("val")] * 2 for b in only_val)
    both = collect(ShardedLoader(tmp_path, 0, 1, batch_size=2, seed=0, epochs=1, splits=("train", "val")))
    assert sorted(users(both)) == train + val
    codes = {u: s for b in both for u, s in zip(b.user_id.tolist(), b.split.tolist())}
    assert all(codes[u] == SPLITS.index("train") for u in train)


def test_missing_folder_manifest_or_split_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere: no such folder"):
        ShardedLoader(tmp_path / "nowhere", 0, 1, batch_size=2, seed=0)
    write_dataset(tmp_path, [[4]])
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json: missing"):
        ShardedLoader(tmp_path, 0, 1, batch_size=2, seed=0)
    write_manifest(tmp_path)
    with pytest.raises(UserError, match=r"split=val: no shard=\*/part-\*\.parquet files"):
        ShardedLoader(tmp_path, 0, 1, batch_size=2, seed=0, splits=("val",))
    with pytest.raises(UserError, match="splits must be a non-empty subset"):
        ShardedLoader(tmp_path, 0, 1, batch_size=2, seed=0, splits=("training",))


def test_wrong_schema_names_file_and_column(tmp_path):
    write_manifest(tmp_path)
    schema = EXAMPLES.set(EXAMPLES.get_field_index("dense"), pa.field("dense", pa.list_(pa.float64())))
    path = write_part(tmp_path, "train", 0, [[example_row(0, "train")]], schema=schema)
    with pytest.raises(UserError, match=re.escape(f"{path}: column 'dense' has type list<") + ".*double>, expected list<.*float>"):
        ShardedLoader(tmp_path, 0, 1, batch_size=1, seed=0)
    path = write_part(tmp_path, "train", 0, [[example_row(0, "train")]], schema=EXAMPLES.remove(1))
    with pytest.raises(UserError, match=re.escape(f"{path}: column 'split' is missing")):
        ShardedLoader(tmp_path, 0, 1, batch_size=1, seed=0)
    path.write_bytes(b"not parquet")
    with pytest.raises(UserError, match=re.escape(f"{path}: not a readable Parquet file")):
        ShardedLoader(tmp_path, 0, 1, batch_size=1, seed=0)


def test_bad_rows_name_file_row_group_and_row(tmp_path):
    write_manifest(tmp_path)
    short = example_row(3, "train")
    short["dense"] = short["dense"][:-1]
    path = write_part(tmp_path, "train", 0, [[example_row(1, "train")], [example_row(2, "train"), short]])
    loader = ShardedLoader(tmp_path, 0, 1, batch_size=3, seed=0, epochs=1, shuffle=False)
    with pytest.raises(UserError, match=re.escape(f"{path}: row group 1, row 1: column 'dense' has 23 values, expected 24")):
        next(loader)
    loader.close()

    bags = example_row(4, "train")
    bags["app_ids"] = bags["app_ids"] + [99]
    path = write_part(tmp_path, "train", 0, [[bags]])
    with pytest.raises(UserError, match=re.escape(f"{path}: row group 0, row 0: column 'app_ids' has 2 values, expected 1")):
        next(ShardedLoader(tmp_path, 0, 1, batch_size=1, seed=0, prefetch=False))

    path = write_part(tmp_path, "train", 0, [[example_row(5, "train"), example_row(6, "val")]])
    with pytest.raises(UserError, match=re.escape(f"{path}: row group 0, row 1: split is 'val' in a split=train folder")):
        next(ShardedLoader(tmp_path, 0, 1, batch_size=2, seed=0, prefetch=False))


def test_too_little_data_for_one_batch_per_rank(tmp_path):
    write_dataset(tmp_path, [[3, 3]])
    with pytest.raises(UserError, match="smallest share is 3 examples, less than one batch of 4"):
        ShardedLoader(tmp_path, 0, 2, batch_size=4, seed=0)


def test_resume_refuses_another_world_size_or_dataset(tmp_path):
    write_dataset(tmp_path, UNEVEN)
    saved = ShardedLoader(tmp_path, 0, 2, batch_size=2, seed=0).state_dict()
    with pytest.raises(UserError, match="saved with world_size=2 but this run has world_size=3"):
        ShardedLoader(tmp_path, 0, 3, batch_size=2, seed=0).load_state_dict(saved)
    with pytest.raises(UserError, match="saved with examples=40 but this run has examples=36"):
        ShardedLoader(tmp_path, 0, 2, batch_size=2, seed=0).load_state_dict({**saved, "examples": 40})
    with pytest.raises(UserError, match="batches_in_epoch=99 but epoch 0 has"):
        ShardedLoader(tmp_path, 0, 2, batch_size=2, seed=0).load_state_dict({**saved, "batches_in_epoch": 99})


def test_gather_bags_concatenates_the_chosen_rows_bags():
    values = np.array([10, 11, 12, 13, 14])
    offsets = np.array([0, 2, 2, 5])  # row 0: [10, 11], row 1: [], row 2: [12, 13, 14]
    assert gather_bags(values, offsets, np.array([2, 0, 1])).tolist() == [12, 13, 14, 10, 11]
    assert gather_bags(values, offsets, np.array([1])).tolist() == []


BIG = [[9, 7, 11, 5, 8], [6, 10, 4, 12, 3], [7, 7, 9, 2, 13]]  # 113 examples in 15 row groups


def take(loader: ShardedLoader, count: int) -> list[int]:
    return [u for _ in range(count) for u in next(loader).user_id.tolist()]


def epoch_of(world: int, tmp_path: Path) -> set[int]:
    """The users that `world` ranks read in epoch 0 (each rank's stream up to its last whole batch)."""
    loaders = [ShardedLoader(tmp_path, r, world, batch_size=4, seed=3, shuffle_window=2, prefetch=False)
               for r in range(world)]
    return {u for loader in loaders for u in take(loader, loader.batches_per_epoch(0))}


def test_a_mid_epoch_reshard_reads_the_rest_of_the_epoch_exactly_once(tmp_path):
    """2 ranks read 3 batches, 3 ranks take the rest and read 1 batch, 1 rank reads what is left:
    every example of the 2 ranks' epoch is read once, but the few each deal leaves out."""
    write_dataset(tmp_path, BIG)
    make = lambda rank, world: ShardedLoader(tmp_path, rank, world, batch_size=4, seed=3, shuffle_window=2,
                                             prefetch=False)
    two = [make(r, 2) for r in range(2)]
    read = [u for loader in two for u in take(loader, 3)]
    three = [make(r, 3) for r in range(3)]
    left_out = [loader.load_resharded_state(two[1].state_dict()) for loader in three]
    assert len(set(left_out)) == 1 and 0 <= left_out[0] < 3 * 4
    read += [u for loader in three for u in take(loader, 1)]
    state = three[2].state_dict()
    assert (state["epoch"], state["batches_in_epoch"], state["bridge"]) == (0, 1, [[2, 3]])

    one = make(0, 1)
    left_out.append(one.load_resharded_state(state))
    rest = one._bridge_now.num_batches
    read += take(one, rest)
    assert len(read) == len(set(read))  # nothing twice
    expected = epoch_of(2, tmp_path)
    assert set(read) <= expected and len(expected) - len(read) == left_out[0] + left_out[-1]
    # then epoch 1, dealt for the one rank
    fresh = make(0, 1)
    plain = {k: v for k, v in one.state_dict().items() if k != "bridge"}
    fresh.load_state_dict({**plain, "epoch": 1, "batches_in_epoch": 0})
    assert next(one).user_id.tolist() == next(fresh).user_id.tolist()


def test_a_checkpoint_inside_a_bridge_resumes_bit_identically(tmp_path):
    write_dataset(tmp_path, BIG)
    make = lambda: ShardedLoader(tmp_path, 1, 3, batch_size=4, seed=3, shuffle_window=2, prefetch=False)
    saved = ShardedLoader(tmp_path, 0, 2, batch_size=4, seed=3, shuffle_window=2, prefetch=False)
    take(saved, 2)
    original = make()
    original.load_resharded_state(saved.state_dict())
    take(original, 1)
    resumed = make()
    resumed.load_state_dict(original.state_dict())
    assert_batches_equal([next(original) for _ in range(3)], [next(resumed) for _ in range(3)])
