"""The adaptive mask: invariants as properties, and each stage on hand-computed cases."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from umask.config import TASKS, MaskConfig
from umask.masking import (evidence_budget, evidence_ratio, gumbel_top_k, reliability,
                           reliability_count_scale, sample_mask, sampling_distribution, slot_utility,
                           target_windows)
from umask_batches import NUM_CATEGORIES, NUM_REGIONS, SPEC, UNMEASURED_SPEC, make_batch

SHORT, LONG, COLD = (TASKS.index(name) for name in TASKS)


def draw(batch, cfg, seed, task=None):
    return sample_mask(batch.dense, batch.observed, batch.time_of_week, SPEC,
                       cfg, torch.Generator().manual_seed(seed), task)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), slots=st.integers(2, 200), share=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31), family=st.sampled_from(["adaptive", "uniform"]))
def test_mask_invariants(batch, slots, share, seed, family):
    data = make_batch(batch, slots, share, seed=seed, start_hour=seed % 168)
    cfg = MaskConfig(family=family)
    mask = draw(data, cfg, seed)
    assert not (mask.evidence & ~data.observed).any(), "evidence must be observed"
    assert not (mask.evidence & mask.target).any(), "a target is never evidence"
    assert not (mask.evidence & ~mask.candidates).any()
    assert mask.target.any(1).all(), "every example has a target window"
    count = mask.candidates.sum(1)
    expected = torch.round(mask.ratio * count).long().clamp(min=1)
    expected = torch.minimum(expected, count)
    assert torch.equal(mask.evidence.sum(1), expected)
    assert torch.equal(mask.budget, expected)
    again = draw(data, cfg, seed)
    assert torch.equal(again.evidence, mask.evidence) and torch.equal(again.target, mask.target)
    assert torch.equal(again.task, mask.task)


def test_different_seeds_give_different_masks():
    data = make_batch(8, 168, 0.5)
    assert not torch.equal(draw(data, MaskConfig(), 1).evidence, draw(data, MaskConfig(), 2).evidence)


def test_target_windows_per_task():
    cfg = MaskConfig(min_history=10, cold_history=24)
    cfg.short.target_min = cfg.short.target_max = 3
    task = torch.tensor([SHORT] * 50 + [COLD])
    cut, target = target_windows(task, 48, cfg, torch.Generator().manual_seed(0))
    assert ((cut[:50] >= 10) & (cut[:50] <= 45)).all()
    t = torch.arange(48)
    expected = (t >= cut[:, None]) & (t < cut[:, None] + 3)
    assert torch.equal(target[:50], expected[:50])
    assert cut[50] == 24 and torch.equal(target[50], t >= 24)


def test_long_windows_shrink_to_short_histories():
    cut, target = target_windows(torch.tensor([LONG] * 20), 10, MaskConfig(),
                                 torch.Generator().manual_seed(0))
    # target_min=24 does not fit in 10 slots: the window keeps at least one slot of history.
    assert (cut >= 1).all() and torch.equal(target.sum(1), 10 - cut)


def test_reliability_on_a_hand_computed_user():
    slots = 48
    dense = torch.zeros(2, slots, NUM_CATEGORIES + NUM_REGIONS + 4)
    dense[0, [0, 24], 0] = math.log1p(3.0)  # only category 0, both days at hour 0
    candidates = torch.zeros(2, slots, dtype=torch.bool)
    candidates[0, [0, 24]] = True
    time_of_week = torch.arange(slots).expand(2, slots)
    r = reliability(dense, candidates, time_of_week, SPEC, MaskConfig())
    # count term 1 - exp(-2/n), n the train split's mean observed slots per example;
    # perfectly regular (one hour of day) and focused (one category)
    train = SPEC.statistics["train"]
    n = train["observed_slots"] / train["examples"]
    assert 0.5 * 168 < n < 0.7 * 168  # make_batch observes 60 % of the slots
    expected = 0.5 * (1 - math.exp(-2 / n)) + 0.25 * 1.0 + 0.25 * 1.0
    assert r[0].item() == pytest.approx(expected, rel=1e-6)
    assert r[1].item() == pytest.approx(0.01)  # no history: the floor


def test_reliability_count_scale_without_statistics_is_one_day():
    assert reliability_count_scale(UNMEASURED_SPEC) == UNMEASURED_SPEC.slots_per_day == 24


def test_evidence_ratio_follows_reliability_and_is_clipped():
    cfg = MaskConfig()  # short: rho 0.5, beta 0.5, mean r 0.5; cold: rho 0.8, beta 0.25
    r = torch.tensor([0.9, 0.1, 0.99])
    ratio = evidence_ratio(r, torch.tensor([SHORT, SHORT, COLD]), cfg)
    expected = [0.5 * (1 + 0.5 * 0.4), 0.5 * (1 - 0.5 * 0.4), 0.8 * (1 + 0.25 * 0.49)]
    assert ratio.tolist() == pytest.approx([expected[0], expected[1], min(expected[2], 0.95)])
    assert evidence_ratio(r, torch.tensor([SHORT] * 3), MaskConfig(family="uniform")).tolist() == \
        pytest.approx([0.5] * 3)


def test_each_switched_off_part_does_what_a_uniform_mask_does_there():
    r = torch.tensor([0.9, 0.1])
    task = torch.tensor([SHORT, COLD])
    assert evidence_ratio(r, task, MaskConfig(reliability_ratio=False)).tolist() == \
        pytest.approx(evidence_ratio(r, task, MaskConfig(family="uniform")).tolist())
    candidates = torch.tensor([[True, True, True, False]] * 2)
    utility = torch.tensor([[100.0, 0.0, 0.0, 0.0]] * 2)
    p = sampling_distribution(utility, candidates, r, task, MaskConfig(cold_start_exploration=False))
    assert p[1].tolist() == pytest.approx([1, 0, 0, 0], abs=1e-6)  # cold: no flattening left
    data = make_batch(2, 72, 1.0)
    cut = torch.tensor([30, 48])
    t = torch.arange(72)
    target = t >= cut[:, None]
    candidates = t < cut[:, None]
    args = (data.dense, candidates, data.time_of_week, target, cut, torch.tensor([SHORT, LONG]), SPEC)
    both = slot_utility(*args, MaskConfig())
    temporal = slot_utility(*args, MaskConfig(spatial_affinity=False))
    spatial = slot_utility(*args, MaskConfig(temporal_emphasis=False))
    assert torch.allclose(temporal + spatial, both)
    assert not torch.equal(temporal, torch.zeros_like(temporal))
    assert not torch.equal(spatial, torch.zeros_like(spatial))
    assert torch.equal(slot_utility(*args, MaskConfig(temporal_emphasis=False, spatial_affinity=False)),
                       torch.zeros_like(both))


def test_budget_rounds_and_keeps_one_slot():
    candidates = torch.zeros(4, 10, dtype=torch.bool)
    candidates[0, :5] = candidates[1, :5] = candidates[2, :3] = True
    budget = evidence_budget(torch.tensor([0.6, 0.01, 1.0, 0.5]), candidates)
    assert budget.tolist() == [3, 1, 3, 0]


def test_gumbel_top_k_draws_in_proportion_to_p():
    rows = 20000
    p = torch.tensor([0.7, 0.1, 0.1, 0.1, 0.0]).expand(rows, 5)
    chosen = gumbel_top_k(p, torch.ones(rows, dtype=torch.long), torch.Generator().manual_seed(0))
    share = chosen.float().mean(0)
    assert share[0].item() == pytest.approx(0.7, abs=0.02)
    assert share[4].item() == 0.0
    everything = gumbel_top_k(p[:3], torch.full((3,), 4), torch.Generator().manual_seed(0))
    assert torch.equal(everything, (p[:3] > 0))


def test_cold_exploration_flattens_toward_uniform():
    candidates = torch.tensor([[True, True, True, True, False]])
    utility = torch.tensor([[100.0, 0.0, 0.0, 0.0, 0.0]])  # softmax alone puts all mass on slot 0
    r = torch.tensor([0.2])
    p = sampling_distribution(utility, candidates, r, torch.tensor([COLD]), MaskConfig())
    eps = 0.5 * (1 - 0.2)
    assert p[0].tolist() == pytest.approx([1 - eps + eps / 4, eps / 4, eps / 4, eps / 4, 0.0], abs=1e-6)
    short = sampling_distribution(utility, candidates, r, torch.tensor([SHORT]), MaskConfig())
    assert short[0].tolist() == pytest.approx([1, 0, 0, 0, 0], abs=1e-6)


def test_temporal_emphasis_short_recency_and_long_periodicity():
    cfg = MaskConfig(spatial_weight=0.0)
    slots = 72
    data = make_batch(2, slots, 1.0)
    task = torch.tensor([SHORT, LONG])
    cut = torch.tensor([30, 48])
    t = torch.arange(slots)
    target = torch.stack([(t >= 30) & (t < 33), (t >= 48) & (t < 50)])
    candidates = t < cut[:, None]
    utility = slot_utility(data.dense, candidates, data.time_of_week, target, cut, task,
                           SPEC, cfg)
    # short: exp decay with a 6-slot half-life, counted back from the slot before the cut
    assert utility[0, 29].item() == pytest.approx(1.0)
    assert utility[0, 23].item() == pytest.approx(0.5)
    # long: slot 24 is at a target hour of day (hour 0): 0.25 * recency + 0.5 same-hour bonus
    recency_24 = 0.5 ** ((47 - 24) / 48)
    assert utility[1, 24].item() == pytest.approx(0.25 * recency_24 + 0.5)
    assert utility[1, 30].item() == pytest.approx(0.25 * 0.5 ** ((47 - 30) / 48))


def test_adaptive_short_mask_prefers_recent_slots_over_uniform():
    data = make_batch(64, 168, 0.8)
    task = torch.full((64,), SHORT)
    adaptive = draw(data, MaskConfig(), 0, task)
    uniform = draw(data, MaskConfig(family="uniform"), 0, task)
    assert torch.equal(adaptive.cut, uniform.cut)

    def recent_share(mask):
        """Share of the 6 candidates just before the cut that became evidence."""
        t = torch.arange(168)
        recent = mask.candidates & (t < mask.cut[:, None]) & (t >= mask.cut[:, None] - 6)
        return ((mask.evidence & recent).sum() / recent.sum()).item()

    # Both keep about half of the history; the adaptive one keeps the recent slots.
    assert recent_share(adaptive) > 0.8
    assert recent_share(uniform) < 0.6


def test_mask_ignores_target_values():
    data = make_batch(4, 96, 0.7)
    mask = draw(data, MaskConfig(), 3)
    perturbed = data.dense.clone()
    perturbed[mask.target] += 5.0
    data.dense = perturbed
    again = draw(data, MaskConfig(), 3)
    assert torch.equal(again.evidence, mask.evidence)
    assert torch.equal(again.reliability, mask.reliability)
