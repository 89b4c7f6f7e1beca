"""Raw id hashing (the feature spec's rule: known values, range, spread) and the loader bags ->
KeyedJaggedTensor step."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.config import EmbeddingsConfig, TableConfig
from embeddings.ids import IdMapper, hash_rows
from umask.spec import stable_hash

MASK64 = (1 << 64) - 1


def reference_splitmix64(x: int) -> int:
    """Vigna's splitmix64 output for state x, in Python's unbounded unsigned ints."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_splitmix64_gives_the_published_sequence():
    # splitmix64 seeded with 0 outputs 0xe220a8397b1dcdaf, then 0x6e789e6aa1b965f4 (state
    # advanced by one gamma), the reference values of Vigna's splitmix64.c.
    got = stable_hash(np.array([0, 0x9E3779B97F4A7C15 - (1 << 64)]), salt=0)
    assert got.tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1, max_size=20),
       st.integers(1, 10**7))
def test_hash_matches_the_unsigned_reference(ids, num_rows):
    rows = hash_rows(torch.tensor(ids, dtype=torch.int64), num_rows).tolist()
    assert rows == [(reference_splitmix64(i & MASK64) >> 1) % num_rows for i in ids]


def test_known_rows_are_stable():
    # Pinned: changing the hash silently remaps every trained embedding row.
    ids = torch.tensor([0, 1, 2**63 - 1, -1, 123456789])
    assert hash_rows(ids, 10).tolist() == [7, 2, 9, 8, 8]
    assert hash_rows(ids, 1_000_003).tolist() == [
        (reference_splitmix64(i & MASK64) >> 1) % 1_000_003 for i in ids.tolist()]


def test_extreme_ids_land_in_range():
    ids = torch.tensor([0, 1, 2**62, 2**63 - 1, -1, -(2**63)])
    for num_rows in (1, 2, 7, 4096, 2**40):
        rows = hash_rows(ids, num_rows)
        assert rows.dtype == torch.int64
        assert bool(((rows >= 0) & (rows < num_rows)).all())
    assert ids.tolist() == [0, 1, 2**62, 2**63 - 1, -1, -(2**63)]  # hashed in place of a copy


def test_sequential_and_strided_ids_spread_evenly():
    # Sequential ids (typical of dense app catalogues) and ids sharing their low bits
    # (multiples of 2^20, typical of upstream hashes) must both fill the rows evenly.
    num_rows = 64
    for ids in (torch.arange(64_000), torch.arange(64_000) * (1 << 20)):
        counts = torch.bincount(hash_rows(ids, num_rows), minlength=num_rows)
        assert counts.min() > 850 and counts.max() < 1150, counts  # mean 1000, sd ~31


def small_cfg() -> EmbeddingsConfig:
    return EmbeddingsConfig(app=TableConfig(num_embeddings=64, dim=4),
                            loc=TableConfig(num_embeddings=32, dim=4))


def test_to_kjt_lays_out_app_then_loc_bags():
    mapper = IdMapper(small_cfg())
    # B*T = 3 slots: app bags [5, 6], [], [7]; loc bags [], [8], [9, 10].
    kjt = mapper.to_kjt(torch.tensor([5, 6, 7]), torch.tensor([2, 0, 1]),
                        torch.tensor([8, 9, 10]), torch.tensor([0, 1, 2]))
    assert kjt.keys() == ["app", "loc"]
    assert kjt.lengths().tolist() == [2, 0, 1, 0, 1, 2]
    assert kjt["app"].values().tolist() == hash_rows(torch.tensor([5, 6, 7]), 64).tolist()
    assert kjt["loc"].values().tolist() == hash_rows(torch.tensor([8, 9, 10]), 32).tolist()
    assert kjt.stride() == 3


def test_negative_ids_are_counted_not_fatal():
    mapper = IdMapper(small_cfg())
    kjt = mapper.to_kjt(torch.tensor([-5, 6, -7]), torch.tensor([3]),
                        torch.tensor([8]), torch.tensor([1]))
    mapper.to_kjt(torch.tensor([-1]), torch.tensor([1]), torch.tensor([-2]), torch.tensor([1]))
    assert mapper.out_of_contract() == {"app": 3, "loc": 1}
    assert bool((kjt["app"].values() < 64).all()) and bool((kjt["app"].values() >= 0).all())


def test_inconsistent_bags_are_rejected_with_the_key():
    mapper = IdMapper(small_cfg())
    with pytest.raises(ValueError, match="loc: lengths sum to 3 but there are 2 ids"):
        mapper.to_kjt(torch.tensor([1]), torch.tensor([1, 0]),
                      torch.tensor([1, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="different slot counts"):
        mapper.to_kjt(torch.tensor([1]), torch.tensor([1]),
                      torch.tensor([1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="app ids must be int64"):
        mapper.to_kjt(torch.tensor([1], dtype=torch.int32), torch.tensor([1]),
                      torch.tensor([1]), torch.tensor([1]))


@pytest.mark.gpu
def test_gpu_gives_the_same_rows_as_cpu():
    ids = torch.cat([torch.arange(10_000), torch.tensor([-1, -(2**63), 2**63 - 1])])
    for num_rows in (7, 4096, 10**7):
        assert torch.equal(hash_rows(ids.cuda(), num_rows).cpu(), hash_rows(ids, num_rows))
