"""Metrics on hand-computed cases, baselines on hand-computed cases and on a dataset whose
right answer is known (a perfectly weekly user)."""
import math

import pytest
import torch

from umask.baselines import global_popularity, hour_of_week_frequency, last_observed, popularity_profile
from umask.config import LossConfig
from umask.losses import absolute_error_channels, info_nce, reconstruction_loss
from umask.metrics import (bucket_labels, completion_metrics, completion_metrics_by_sparsity,
                           grouped_bootstrap_interval,
                           mean_absolute_error, mean_reciprocal_rank, recall_at_k,
                           root_mean_squared_error, sparsity_bucket, topk_accuracy)

SCORES = torch.tensor([[0.1, 0.5, 0.2, 0.9],   # ranking 3, 1, 2, 0
                       [0.8, 0.1, 0.3, 0.0],   # ranking 0, 2, 1, 3
                       [0.2, 0.2, 0.9, 0.1]])  # ranking 2, then 0 and 1 tied
TRUTH = torch.tensor([1, 3, 1])  # true ranks 2, 4, 3 (ties count against the prediction)


def test_ranking_metrics_by_hand():
    assert topk_accuracy(SCORES, TRUTH, 1).item() == 0.0
    assert topk_accuracy(SCORES, TRUTH, 2).item() == pytest.approx(1 / 3)
    assert topk_accuracy(SCORES, TRUTH, 5).item() == 1.0
    assert mean_reciprocal_rank(SCORES, TRUTH).item() == pytest.approx((1 / 2 + 1 / 4 + 1 / 3) / 3)
    assert math.isnan(topk_accuracy(SCORES[:0], TRUTH[:0], 1).item())


def test_regression_and_recall_by_hand():
    pred, true = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 4.0, 1.0])
    assert mean_absolute_error(pred, true).item() == pytest.approx(5 / 3)
    assert root_mean_squared_error(pred, true).item() == pytest.approx(math.sqrt(13 / 3))
    relevant = torch.tensor([[False, True, False, True],
                             [False, False, False, False],  # no relevant items: not counted
                             [True, True, True, False]])
    # top-2: row 0 -> {3, 1} both relevant (2/2); row 2 -> {2, 0 or 1} (2/3)
    assert recall_at_k(SCORES, relevant, 2).item() == pytest.approx((1 + 2 / 3) / 2)


def test_sparsity_buckets():
    share = torch.tensor([0.0, 0.05, 0.06, 0.3, 0.31, 1.0])
    assert sparsity_bucket(share).tolist() == [0, 0, 1, 2, 3, 4]
    assert bucket_labels() == ["[0, 0.05]", "(0.05, 0.15]", "(0.15, 0.3]", "(0.3, 0.5]", "(0.5, 1]"]


def layout_slot(category, region, volume, num_categories=2, num_regions=1):
    """One slot [F] with one category and one region used."""
    slot = torch.zeros(num_categories + num_regions + 4)
    slot[category] = 1.0
    slot[num_categories + 1 + region] = 1.0
    slot[-2], slot[-1] = 1.0, volume
    return slot


def test_completion_metrics_on_a_hand_made_batch():
    truth = torch.stack([layout_slot(0, 0, 2.0), layout_slot(1, 1, 4.0), layout_slot(2, 0, 9.0)])[None]
    pred = torch.stack([layout_slot(0, 0, 3.0), layout_slot(0, 1, 4.0), layout_slot(2, 1, 0.0)])[None]
    scored = torch.tensor([[True, True, False]])
    m = completion_metrics(pred, truth, scored, num_categories=2, num_regions=1)
    # slot 0 right everywhere; slot 1: true category 1 scores 0 and ties with category 2 -> rank 3
    assert m == pytest.approx({"slots": 2, "category_acc1": 0.5, "category_acc5": 1.0,
                               "category_mrr": (1 + 1 / 3) / 2, "region_acc1": 1.0,
                               "volume_mae": 0.5, "volume_rmse": math.sqrt(0.5)})
    by_bucket = completion_metrics_by_sparsity(pred, truth, scored, torch.tensor([0.01]), 2, 1)
    assert by_bucket["[0, 0.05]"] == by_bucket["all"]
    assert by_bucket["(0.5, 1]"]["slots"] == 0 and math.isnan(by_bucket["(0.5, 1]"]["category_acc1"])


def test_baselines_by_hand():
    dense = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]])  # [1,5,1]
    evidence = torch.tensor([[False, True, False, True, False]])
    profile = torch.tensor([9.0])
    assert last_observed(dense, evidence, profile).flatten().tolist() == [9, 2, 2, 4, 4]
    assert global_popularity(dense, evidence, profile).flatten().tolist() == [9, 2, 9, 4, 9]
    time_of_week = torch.tensor([[0, 1, 1, 2, 1]])
    # hour 1 has evidence 2.0; hour 0 has none -> the user's mean 3.0; hour 2 is evidence itself
    assert hour_of_week_frequency(dense, evidence, time_of_week, profile, 168).flatten().tolist() == [3, 2, 2, 4, 2]
    assert hour_of_week_frequency(dense, torch.zeros_like(evidence), time_of_week, profile, 168).flatten().tolist() == [9] * 5
    observed = torch.tensor([[True, True, False, False, False]])
    assert popularity_profile(dense, observed).tolist() == [1.5]


def test_weekly_user_is_solved_by_hour_of_week_and_not_by_the_others():
    """Each user's category and region depend only on the hour of week; evidence is week one,
    the target week two, so the user's own hour-of-week frequency is exactly right."""
    num_categories, num_regions, users, slots = 4, 3, 6, 336
    g = torch.Generator().manual_seed(0)
    habit_category = torch.randint(0, num_categories + 1, (users, 168), generator=g)
    habit_region = torch.randint(0, num_regions + 1, (users, 168), generator=g)
    habit_volume = torch.rand(users, 168, generator=g) * 10
    time_of_week = (torch.arange(slots) % 168).expand(users, slots)
    dense = torch.zeros(users, slots, num_categories + num_regions + 4)
    dense.scatter_(2, habit_category.gather(1, time_of_week)[..., None], 1.0)
    dense.scatter_(2, (num_categories + 1 + habit_region.gather(1, time_of_week))[..., None], 1.0)
    dense[..., -2] = 1.0
    dense[..., -1] = habit_volume.gather(1, time_of_week)
    evidence = (torch.arange(slots) < 168).expand(users, slots)
    target = ~evidence
    profile = popularity_profile(dense, evidence)

    def score(pred):
        return completion_metrics(pred, dense, target, num_categories, num_regions)

    exact = score(hour_of_week_frequency(dense, evidence, time_of_week, profile, 168))
    assert exact["category_acc1"] == 1.0 and exact["region_acc1"] == 1.0 and exact["volume_mae"] == 0.0
    last = score(last_observed(dense, evidence, profile))
    popular = score(global_popularity(dense, evidence, profile))
    assert last["category_acc1"] < 0.5 and popular["category_acc1"] < 0.5
    assert last["volume_mae"] > 1.0 and popular["volume_mae"] > 1.0


def test_reconstruction_loss_by_hand():
    prediction = torch.zeros(1, 3, 2)
    truth = torch.tensor([[[1.0, 2.0], [3.0, 3.0], [5.0, 5.0]]])
    scored = torch.tensor([[True, True, False]])
    weights = torch.tensor([1.0, 3.0])  # normalized to 0.25, 0.75
    # slot 0: 0.25 * 1 + 0.75 * 4 = 3.25; slot 1: 9; the unscored slot 2 does not count
    assert reconstruction_loss(prediction, truth, scored, weights).item() == pytest.approx((3.25 + 9) / 2)
    assert reconstruction_loss(prediction, truth, torch.zeros_like(scored), weights).item() == 0.0
    # channel 1 by absolute error: slot 0: 0.25 * 1 + 0.75 * 2 = 1.75; slot 1: 0.25 * 9 + 0.75 * 3 = 4.5
    absolute = torch.tensor([False, True])
    assert reconstruction_loss(prediction, truth, scored, weights, absolute).item() == pytest.approx((1.75 + 4.5) / 2)


def test_volume_error_is_absolute_unless_configured_squared():
    assert absolute_error_channels(6, 5, LossConfig()).tolist() == [False] * 5 + [True]
    assert not absolute_error_channels(6, 5, LossConfig(volume_error="squared")).any()
    assert dict(LossConfig(volume_error="l2").problems())["volume_error"] == "must be 'absolute' or 'squared'"


def test_info_nce_by_hand():
    z_short = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_long = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    extra = torch.tensor([[-1.0, 0.0]])
    # unit vectors: row 0 scores [1, 0, -1] / 0.5; row 1 scores [0, 1, 0] / 0.5
    row0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    row1 = -math.log(math.exp(2) / (1 + math.exp(2) + 1))
    assert info_nce(z_short, z_long, extra, 0.5).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_grouped_bootstrap_interval_resamples_users_not_slots():
    # A constant difference has no spread, whatever the groups.
    assert grouped_bootstrap_interval(torch.full((6,), 0.25), torch.tensor([1, 1, 2, 2, 3, 3])) == \
        pytest.approx((0.25, 0.25, 0.25))
    # User 7 gains 1 on 9 slots, user 8 loses 1 on 1 slot: the slot mean is +0.8. Resampling
    # slots would keep the interval near +0.8; resampling 2 users often draws user 8 twice,
    # so the interval reaches -1 (all picks user 8) and +1 (all picks user 7).
    difference = torch.tensor([1.0] * 9 + [-1.0])
    group = torch.tensor([7] * 9 + [8])
    mean, low, high = grouped_bootstrap_interval(difference, group, seed=1)
    assert mean == pytest.approx(0.8) and (low, high) == (-1.0, 1.0)
    # Many users who all gain: the interval excludes 0 and is the same under the same seed.
    gains = torch.linspace(0.1, 0.3, 200)
    users = torch.arange(200) // 4
    mean, low, high = grouped_bootstrap_interval(gains, users, seed=3)
    assert 0 < low < mean < high and (mean, low, high) == grouped_bootstrap_interval(gains, users, seed=3)
    assert all(math.isnan(v) for v in grouped_bootstrap_interval(torch.zeros(0), torch.zeros(0)))


def test_grouped_bootstrap_intervals_of_several_rows_are_those_of_separate_calls():
    from umask.metrics import grouped_bootstrap_intervals

    g = torch.Generator().manual_seed(1)
    differences, group = torch.randn(3, 40, generator=g), torch.randint(0, 9, (40,), generator=g)
    together = grouped_bootstrap_intervals(differences, group, seed=4)
    for row, interval in zip(differences, together):
        assert interval == pytest.approx(grouped_bootstrap_interval(row, group, seed=4))
    assert all(math.isnan(v) for v in grouped_bootstrap_intervals(differences[:, :0], group[:0])[1])


def test_hour_of_day_frequency_is_the_users_mean_at_that_hour_of_day():
    from umask.baselines import hour_of_day_frequency

    slots, per_day = 48, 24
    tow = torch.arange(slots)[None]  # two days
    dense = (tow % per_day).float()[..., None].repeat(1, 1, 2)  # [1,48,2]: the hour of day
    evidence = (tow < per_day) & (tow % 2 == 0)  # even hours of day 1 only
    filled = hour_of_day_frequency(dense, evidence, tow, torch.zeros(2), per_day)
    assert torch.equal(filled[0, 24 + 6], torch.tensor([6.0, 6.0]))  # day 2, 06:00: day 1's 06:00
    assert torch.allclose(filled[0, 24 + 7], torch.full((2,), 11.0))  # no evidence at 07: the mean of 0, 2, ..., 22
    assert torch.equal(filled[0, 4], dense[0, 4])  # evidence slots are kept
