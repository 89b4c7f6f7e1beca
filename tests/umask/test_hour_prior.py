"""The evidence-only hour prior: its values by hand, that targets never reach the DiT through it,
and that the residual model starts as the hour_of_week baseline."""
import math

import pytest
import torch

from umask.baselines import hour_of_week_frequency
from umask.config import ModelConfig
from umask.hour_prior import evidence_mean_by_hour, hour_prior_features
from umask.model import UMask
from umask_batches import SPARSE_DIM, SPEC, make_batch


def prior_model(prior_residual: bool = False):
    torch.manual_seed(0)
    return UMask(ModelConfig(hidden=32, depth=2, heads=2, user_dim=16, hour_prior=True,
                             prior_residual=prior_residual),
                 SPEC, SPARSE_DIM)


def test_evidence_mean_by_hour_by_hand():
    values = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]])  # [1,5,1]
    evidence = torch.tensor([[True, True, False, True, False]])
    hour = torch.tensor([[0, 0, 0, 2, 1]])
    mean, count = evidence_mean_by_hour(values, evidence, hour, 3, torch.tensor([9.0]))
    # hour 0: evidence 1 and 2 (slot 2 is not evidence); hour 1: none -> user mean (1+2+4)/3
    assert mean.flatten().tolist() == pytest.approx([1.5, 1.5, 1.5, 4.0, 7 / 3])
    assert count.flatten().tolist() == [2, 2, 2, 1, 0]
    mean, count = evidence_mean_by_hour(values, torch.zeros_like(evidence), hour, 3, torch.tensor([9.0]))
    assert mean.flatten().tolist() == [9.0] * 5 and count.flatten().tolist() == [0] * 5


def test_prior_features_pool_the_same_hour_of_day_across_days():
    # Slots at hours of week 3, 27, 51 (all 03:00) and 4; evidence at 3 and 51 only.
    values = torch.tensor([[[2.0], [100.0], [6.0], [10.0]]])
    evidence = torch.tensor([[True, False, True, False]])
    time_of_week = torch.tensor([[3, 27, 51, 4]])
    features = hour_prior_features(values, evidence, time_of_week, 24)  # [1,4,2*1+3]
    week_mean, day_mean, counts = features[0, :, 0], features[0, :, 1], features[0, :, 2:]
    assert week_mean.tolist() == [2.0, 4.0, 6.0, 4.0]  # hour 27 and 4: no evidence -> user mean 4
    assert day_mean.tolist() == [4.0, 4.0, 4.0, 4.0]  # 03:00 holds 2 and 6; 04:00 none -> 4
    expected = [[1, 2, 2], [0, 2, 2], [1, 2, 2], [0, 0, 2]]  # hour of week, hour of day, window
    assert torch.allclose(counts, torch.log1p(torch.tensor(expected, dtype=torch.float32)))
    # Without any evidence the means fall back to 0, not to a population value.
    empty = hour_prior_features(values, torch.zeros_like(evidence), time_of_week, 24)
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.mark.parametrize("prior_residual", [False, True])
def test_targets_never_reach_the_dit_through_the_hour_prior(prior_residual):
    """With the switch on, changing target values leaves the prior, the DiT's token inputs
    and the completion bit-identical; changing one evidence value changes them."""
    model = prior_model(prior_residual)
    torch.nn.init.normal_(model.dit.final_layer.linear.weight)  # so the DiT's own output counts too
    data = make_batch(seed=1)
    mask = model.sample_mask(data.dense, data.observed, data.time_of_week, torch.Generator().manual_seed(0))
    assert mask.target.any()
    moved = data.dense.clone()
    moved[mask.target] += 3.0
    poisoned = data.dense.clone()
    poisoned[~mask.evidence] = math.inf  # not even inf or nan outside the evidence gets in
    poisoned[~mask.evidence & ~mask.target] = math.nan
    prior = hour_prior_features(data.dense, mask.evidence, data.time_of_week, 24)
    assert torch.equal(hour_prior_features(poisoned, mask.evidence, data.time_of_week, 24), prior)
    x_t = torch.zeros_like(data.dense)

    def tokens(dense):
        prior = hour_prior_features(dense, mask.evidence, data.time_of_week, 24)
        return model.dit.embedder(x_t, dense, mask.evidence, data.time_of_week, data.slot_sparse, prior)

    def completed(dense):
        done = model.complete(dense, mask.evidence, data.time_of_week, data.slot_sparse, steps=3,
                              generator=torch.Generator().manual_seed(0))
        return done[~mask.evidence[..., None].expand_as(done)]  # generated slots only

    base = tokens(data.dense)
    assert torch.equal(tokens(moved), base)
    assert torch.equal(completed(moved), completed(data.dense))
    first_evidence = mask.evidence.nonzero()[0]
    shifted = data.dense.clone()
    shifted[first_evidence[0], first_evidence[1]] += 3.0
    assert not torch.equal(tokens(shifted), base)


def test_the_switch_adds_the_prior_projection_and_it_learns():
    assert prior_model().dit.embedder.hour_prior is not None
    off = UMask(ModelConfig(hidden=32, depth=2, heads=2, user_dim=16), SPEC, SPARSE_DIM)
    assert off.dit.embedder.hour_prior is None
    model = prior_model()
    data = make_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # adaLN-Zero zeroes the output layer, so gradients reach the embedder from step 2 on.
    for step in range(2):
        optimizer.zero_grad()
        model(data.dense, data.observed, data.time_of_week, data.slot_sparse,
              generator=torch.Generator().manual_seed(step))["loss"].backward()
        optimizer.step()
    assert model.dit.embedder.hour_prior.weight.grad.abs().sum() > 0


def test_untrained_residual_model_completes_like_the_hour_of_week_baseline():
    """adaLN-Zero zeroes the DiT's output, so with prior_residual every DDIM step predicts the
    prior's hour-of-week block: the completion is the baseline's (scaled and back)."""
    model = prior_model(prior_residual=True)
    data = make_batch(seed=2)
    mask = model.sample_mask(data.dense, data.observed, data.time_of_week, torch.Generator().manual_seed(0))
    has_evidence = mask.evidence.any(1)
    assert has_evidence.all()  # the baseline falls back to a profile, the prior to 0
    completed = model.complete(data.dense, mask.evidence, data.time_of_week, data.slot_sparse, steps=4,
                               generator=torch.Generator().manual_seed(0))
    baseline = hour_of_week_frequency(data.dense, mask.evidence, data.time_of_week,
                                      torch.zeros(data.dense.shape[-1]), SPEC.slots_per_week)
    assert torch.allclose(completed, baseline, atol=1e-5)
    plain = prior_model(prior_residual=False).complete(data.dense, mask.evidence, data.time_of_week,
                                                       data.slot_sparse, steps=4,
                                                       generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(plain, baseline, atol=1e-2)


def test_residual_without_the_prior_is_refused():
    assert ("prior_residual", "needs hour_prior: true (the residual's base is the prior)") in \
        ModelConfig(prior_residual=True).problems()
    with pytest.raises(ValueError, match="prior_residual needs hour_prior"):
        UMask(ModelConfig(prior_residual=True), SPEC, SPARSE_DIM)


def test_the_residual_base_mixes_hour_of_week_and_hour_of_day_per_channel():
    """With week weight 0 and day weight 1 the untrained model completes with the user's
    evidence mean at the slot's hour of day; the weights are trained parameters."""
    model = prior_model(prior_residual=True)
    with torch.no_grad():
        model.dit.prior_week_weight.zero_()
        model.dit.prior_day_weight.fill_(1.0)
    data = make_batch(seed=2)
    mask = model.sample_mask(data.dense, data.observed, data.time_of_week, torch.Generator().manual_seed(0))
    completed = model.complete(data.dense, mask.evidence, data.time_of_week, data.slot_sparse, steps=2,
                               generator=torch.Generator().manual_seed(0))
    by_hour_of_day = hour_of_week_frequency(data.dense, mask.evidence, data.time_of_week % SPEC.slots_per_day,
                                            torch.zeros(data.dense.shape[-1]), SPEC.slots_per_day)
    assert torch.allclose(completed, by_hour_of_day, atol=1e-5)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"dit.prior_week_weight", "dit.prior_day_weight"} <= names
