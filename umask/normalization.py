"""The dense channels' normalisation, from the feature spec's train statistics (no constants).

Diffusion noises with unit-variance Gaussians, so the model works on channels centred on their
mean and divided by their spread: x_model = (x - shift) / scale. featurize measures the train
split's observed slots (umask/statistics.py) and the spec carries the numbers into every
checkpoint and export bundle, so training, eval, complete and the bundle normalise alike.

shift is each channel's mean over the train split's observed slots. scale is one number per
channel family (app categories, regions, activity, volume; umask.spec.DenseLayout): the
family's pooled standard deviation sqrt(mean_c std_c^2), so that the channels of a family keep
their ratios (the argmax of a slot's categories or regions is the forecast) while each family
varies by about 1. Centring on the population's mean also makes 0, the value the model reads
for "nothing known" (a user without evidence in the hour prior, the prior residual's base),
mean "the population's average slot" rather than "no usage".

A spec without train statistics (format 1.0, made before featurize measured them, or one built
from a config alone to count parameters) gets shift 0 and scale 1: the values as featurize
writes them (log1p counts and bytes, region shares), the model's input before statistics.
"""
import torch
from torch import Tensor, nn

from umask.config import LossConfig
from umask.losses import absolute_error_channels, channel_weights
from umask.spec import FeatureSpec
from umask.statistics import train_channels

# A family whose observed values never vary (for example a single region) keeps scale 1.
MIN_SCALE = 1e-6


def channel_families(spec: FeatureSpec) -> list[tuple[str, slice]]:
    """The dense channels of each family in spec.layout: (name, channels) in channel order."""
    layout = spec.layout
    return [("category", layout.category), ("region", layout.region),
            ("activity", slice(layout.activity, layout.activity + 1)),
            ("volume", slice(layout.volume, layout.volume + 1))]


def channel_normalization(spec: FeatureSpec) -> tuple[Tensor, Tensor]:
    """(shift [F], scale [F]) float32 of x_model = (x - shift) / scale for spec's dense channels.

    shift: per-channel mean over the train split's observed slots; scale: per family, the pooled
    population standard deviation sqrt(mean over the family's channels of std_c^2) (module
    docstring). Without train statistics: zeros and ones. On the CPU whatever the default
    device, so a model built on "meta" (to count parameters) still computes them.
    """
    channels = spec.layout.num_channels
    stats = train_channels(spec)
    if stats is None:
        return torch.zeros(channels, device="cpu"), torch.ones(channels, device="cpu")
    mean = torch.tensor(stats["mean"], dtype=torch.float64, device="cpu")
    std = torch.tensor(stats["std"], dtype=torch.float64, device="cpu")
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"spec statistics hold {mean.numel()} channels, the layout {channels}")
    scale = torch.ones(channels, dtype=torch.float64, device="cpu")
    for _, family in channel_families(spec):
        pooled = std[family].pow(2).mean().sqrt()
        scale[family] = pooled if pooled > MIN_SCALE else 1.0
    return mean.float(), scale.float()


def register_channel_buffers(module: nn.Module, spec: FeatureSpec, loss: LossConfig) -> None:
    """The [F] buffers a network of spec's channels scores and scales them with, registered on
    `module` (not persistent: they follow from the spec and the config, which travel with it):
    loss_weights and absolute_error (umask/losses.py), channel_shift and channel_scale
    (x_model = (x - channel_shift) / channel_scale, `channel_normalization`)."""
    layout = spec.layout
    module.register_buffer("loss_weights", channel_weights(spec.num_categories, spec.num_regions, loss),
                           persistent=False)
    module.register_buffer("absolute_error", absolute_error_channels(layout.num_channels, layout.volume, loss),
                           persistent=False)
    shift, scale = channel_normalization(spec)
    module.register_buffer("channel_shift", shift, persistent=False)
    module.register_buffer("channel_scale", scale, persistent=False)
