"""featurize's shuffle files (trainer/data/shuffle.py): a run holds each bucket's rows once,
empty buckets read as nothing, and a small buffer gives several runs whose segments together
are the input."""
import numpy as np
import pyarrow as pa

from trainer.data.shuffle import partition_into_runs, read_bucket, read_segment, run_rows, write_run
from umask.contract import NORMALIZED_EVENTS
from umask.slots import bucket_of

SCHEMA = pa.schema([("user_id", pa.int64()), ("value", pa.int32())])


def test_a_run_gives_back_each_bucket_and_nothing_for_the_empty_ones(tmp_path):
    segments = [(1, pa.table({"user_id": [5, 6], "value": pa.array([1, 2], pa.int32())})),
                (4, pa.table({"user_id": [9], "value": pa.array([3], pa.int32())}))]
    rows = write_run(tmp_path / "run", iter(segments), 6, SCHEMA)
    assert rows.tolist() == [0, 2, 0, 0, 1, 0]
    assert run_rows(tmp_path / "run", 6).tolist() == rows.tolist()
    for bucket in (0, 2, 3, 5):
        assert read_segment(tmp_path / "run", bucket) is None
    assert read_segment(tmp_path / "run", 1).equals(segments[0][1])
    assert read_segment(tmp_path / "run", 4).equals(segments[1][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow", "run.index"]


def test_partitioned_runs_hold_every_event_once_in_its_users_bucket(tmp_path):
    rng = np.random.default_rng(0)
    users = rng.integers(0, 2**62, 50)
    n = 10_000
    events = pa.table({"user_id": users[rng.integers(0, 50, n)], "ts": np.arange(n, dtype=np.int64),
                       "app_id": rng.integers(0, 9, n), "loc_id": pa.array(rng.integers(0, 9, n), pa.int64()),
                       "traffic_bytes": pa.array(np.ones(n, np.int64)), "event": pa.array(np.zeros(n, np.int8))},
                      schema=NORMALIZED_EVENTS)
    runs, rows, total = partition_into_runs(events.to_batches(max_chunksize=1000), tmp_path / "unit", 7, 2500,
                                            NORMALIZED_EVENTS)
    assert len(runs) == 4 and total == n  # a run each time 2,500 rows were held
    expected = bucket_of(events.column("user_id").to_numpy(), 7)
    assert rows.tolist() == np.bincount(expected, minlength=7).tolist()
    for bucket in range(7):
        got = read_bucket(runs, bucket, NORMALIZED_EVENTS)
        want = events.filter(pa.array(expected == bucket))
        assert got.equals(want)  # in input order within the bucket
    assert len(list(tmp_path.iterdir())) == 8  # two files a run, whatever the buckets
