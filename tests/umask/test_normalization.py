"""The dense channels' normalisation comes from the spec's train statistics."""
from dataclasses import replace

import torch

from umask.config import ModelConfig
from umask.model import UMask
from umask.normalization import channel_families, channel_normalization
from umask_batches import SPARSE_DIM, SPEC, UNMEASURED_SPEC, make_batch, train_statistics


def test_each_family_is_centred_per_channel_and_scaled_to_unit_spread():
    data = make_batch(64, 168, seed=123)  # the sample SPEC was measured on
    shift, scale = channel_normalization(SPEC)
    normalised = (data.dense[data.observed] - shift) / scale  # [observed slots, F]
    assert normalised.mean(0).abs().max() < 1e-4
    for name, family in channel_families(SPEC):
        values = normalised[:, family]
        assert abs(values.var(0, unbiased=False).mean().item() - 1) < 1e-4, name
        assert torch.unique(scale[family]).numel() == 1, name  # one scale keeps the argmax


def test_another_traffic_scale_gives_the_same_model_inputs():
    data = make_batch(8, 168, seed=123)
    louder = make_batch(8, 168, seed=123)
    louder.dense[..., -1] = (louder.dense[..., -1] * 3 + 5) * louder.observed  # other bytes scale
    spec = replace(UNMEASURED_SPEC, statistics=train_statistics(data))
    louder_spec = replace(UNMEASURED_SPEC, statistics=train_statistics(louder))
    cfg = ModelConfig(hidden=32, heads=2, user_dim=16)
    mine, theirs = UMask(cfg, spec, SPARSE_DIM), UMask(cfg, louder_spec, SPARSE_DIM)
    inputs = mine._model_inputs(data.dense, data.slot_sparse, None)[0][data.observed]
    louder_inputs = theirs._model_inputs(louder.dense, louder.slot_sparse, None)[0][louder.observed]
    assert torch.allclose(inputs, louder_inputs, atol=1e-4)


def test_without_statistics_values_are_taken_as_featurize_wrote_them():
    shift, scale = channel_normalization(UNMEASURED_SPEC)
    assert torch.equal(shift, torch.zeros(UNMEASURED_SPEC.layout.num_channels))
    assert torch.equal(scale, torch.ones(UNMEASURED_SPEC.layout.num_channels))
