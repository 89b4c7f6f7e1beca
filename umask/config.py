"""Typed settings of the U-MASK model: sizes of U-SCOPE and the DiT, diffusion, masks, losses.

Plain dataclasses (no omegaconf import: umask/ depends on torch only); trainer/config.py
composes them into the run config, and configs/model/*.yaml name the sizes (tiny, base, xl).
Every constant of the method lives here with its default; /work/shared/umask-method.md
sections 3-5 say where each one enters.
"""
from dataclasses import dataclass, field, fields, is_dataclass

from umask.errors import UserError

TASKS = ("short", "long", "cold")  # task tau; its index is the task id used in tensors
ATTENTION_MODES = ("evidence_keys", "evidence_causal", "bias")
BACKBONES = ("dit", "mae")  # model.backbone: U-MASK, or the learned baseline of umask/mae.py
# Lengths below are in slots (hours with the default 3600-s slots). time_of_week, which every
# batch carries per slot, is the slot of the week in [0, spec.slots_per_week): the model takes
# the slots per day and week from the feature spec (umask/spec.py), never from a constant.


@dataclass
class TaskMaskConfig:
    """How one task tau picks its target window and ranks evidence (method section 3)."""

    target_min: int = 1  # slots in the target window, drawn uniformly in [min, max]
    target_max: int = 6  # (cold ignores both: its target is everything after the history)
    ratio: float = 0.5  # rho_tau: evidence share of the candidate slots for an average user
    reliability_gain: float = 0.5  # beta_tau: how much rho follows r_u - reliability_mean
    recency_weight: float = 1.0  # temporal emphasis: weight of exp-decay recency
    recency_halflife: float = 6.0  # slots before the cut after which recency halves
    periodic_weight: float = 0.0  # temporal emphasis: bonus for the target's hours of day/week
    exploration: float = 0.0  # eps = exploration * (1 - r_u): flattening toward uniform

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 1 <= self.target_min <= self.target_max:
            out.append(("target_min", "must satisfy 1 <= target_min <= target_max"))
        if not 0.0 < self.ratio <= 1.0:
            out.append(("ratio", "must be in (0, 1]"))
        if self.recency_halflife <= 0:
            out.append(("recency_halflife", "must be positive"))
        for key in ("reliability_gain", "recency_weight", "periodic_weight"):
            if getattr(self, key) < 0:
                out.append((key, "must be >= 0"))
        if not 0.0 <= self.exploration <= 1.0:
            out.append(("exploration", "must be in [0, 1]"))
        return out


@dataclass
class MaskConfig:
    """The user- and task-adaptive mask generator (method section 3).

    problems() checks this level only; the run config also walks short/long/cold.
    """

    family: str = "adaptive"  # adaptive | uniform (ablation: uniform sampling at ratio rho_tau)
    task_weights: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2])  # short, long, cold
    short: TaskMaskConfig = field(default_factory=TaskMaskConfig)
    long: TaskMaskConfig = field(default_factory=lambda: TaskMaskConfig(
        target_min=24, target_max=72, ratio=0.5, recency_weight=0.25, recency_halflife=48.0,
        periodic_weight=1.0))
    cold: TaskMaskConfig = field(default_factory=lambda: TaskMaskConfig(
        ratio=0.8, reliability_gain=0.25, recency_weight=0.0, periodic_weight=1.0,
        exploration=0.5))
    min_history: int = 24  # short/long cut points leave at least this many slots before them
    cold_history: int = 24  # cold: slots of history (one day); the rest of the window is target
    ratio_min: float = 0.05  # rho is clipped to [ratio_min, ratio_max]
    ratio_max: float = 0.95
    # r_u at which rho = rho_tau: the midpoint of r_u's range (0, 1), not a measured mean.
    reliability_mean: float = 0.5
    # The count term of r_u, 1 - exp(-observed candidates / n), takes n from the data: the train
    # split's mean observed slots per example (umask/masking.py, reliability_count_scale).
    reliability_weights: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.25])
    # ^ weights of the count, hour-of-day regularity and (1 - usage entropy) terms of r_u
    temporal_weight: float = 1.0  # lambda_T
    spatial_weight: float = 1.0  # lambda_S
    spatial_feature_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    # ^ weights of region mix, app-category mix and volume in the spatial affinity
    same_hour_bonus: float = 0.5  # periodic bonus for a slot at a target hour of day
    same_week_slot_bonus: float = 0.5  # extra bonus at a target hour of week
    temperature: float = 0.5  # kappa of softmax(utility / kappa)
    # One switch per part of the adaptive mask, for its ablation (docs/evaluation.md); a part
    # switched off does what a uniform mask does there, at the same budget.
    reliability_ratio: bool = True  # rho follows r_u; off: rho = rho_tau for every user
    temporal_emphasis: bool = True  # recency and periodic bonus enter the utility; off: 0
    spatial_affinity: bool = True  # feature-weighted affinity enters the utility; off: 0
    cold_start_exploration: bool = True  # eps flattens p toward uniform; off: eps = 0

    def task(self, name: str) -> TaskMaskConfig:
        return getattr(self, name)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.family not in ("adaptive", "uniform"):
            out.append(("family", "must be 'adaptive' or 'uniform'"))
        if len(self.task_weights) != len(TASKS) or min(self.task_weights, default=0) < 0 \
                or sum(self.task_weights) <= 0:
            out.append(("task_weights", "must be 3 non-negative weights (short, long, cold), not all 0"))
        for key in ("min_history", "cold_history"):
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        if not 0.0 < self.ratio_min <= self.ratio_max <= 1.0:
            out.append(("ratio_min", "must satisfy 0 < ratio_min <= ratio_max <= 1"))
        if not 0.0 < self.reliability_mean < 1.0:
            out.append(("reliability_mean", "must be in (0, 1)"))
        if len(self.reliability_weights) != 3 or min(self.reliability_weights, default=0) < 0 \
                or sum(self.reliability_weights) <= 0:
            out.append(("reliability_weights", "must be 3 non-negative weights, not all 0"))
        if len(self.spatial_feature_weights) != 3 or min(self.spatial_feature_weights, default=0) < 0:
            out.append(("spatial_feature_weights", "must be 3 non-negative weights"))
        for key in ("temporal_weight", "spatial_weight", "same_hour_bonus", "same_week_slot_bonus"):
            if getattr(self, key) < 0:
                out.append((key, "must be >= 0"))
        if self.temperature <= 0:
            out.append(("temperature", "must be positive"))
        return out


@dataclass
class DiffusionConfig:
    """Noise schedule and sampler of the backbone (method section 4)."""

    train_steps: int = 200  # diffusion steps the schedule is defined on
    schedule: str = "cosine"  # cosine | linear
    cosine_offset: float = 0.008  # s of the cosine schedule (Nichol & Dhariwal)
    linear_beta_start: float = 1e-4
    linear_beta_end: float = 0.02
    sample_steps: int = 20  # DDIM steps at inference
    # Draw training steps only from the ones DDIM visits with sample_steps (with 1 step: the
    # pure-noise step alone), instead of uniformly from all train_steps.
    train_on_sample_steps: bool = False

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.train_steps < 2:
            out.append(("train_steps", "must be >= 2"))
        if self.schedule not in ("cosine", "linear"):
            out.append(("schedule", "must be 'cosine' or 'linear'"))
        if self.cosine_offset <= 0:
            out.append(("cosine_offset", "must be positive"))
        if not 0.0 < self.linear_beta_start < self.linear_beta_end < 1.0:
            out.append(("linear_beta_start", "must satisfy 0 < start < end < 1"))
        if not 1 <= self.sample_steps <= self.train_steps:
            out.append(("sample_steps", f"must be in [1, train_steps={self.train_steps}]"))
        return out


@dataclass
class LossConfig:
    """Weights of the training objective (method section 5)."""

    # Weights of each channel family's mean squared error (umask/losses.py, channel_weights):
    # equal, since the normalisation gives every family a spread of about 1.
    category_weight: float = 1.0  # the app-category channels
    region_weight: float = 1.0  # the region-share channels
    activity_weight: float = 1.0
    volume_weight: float = 1.0
    # The volume channel's error: "absolute" makes the x0 estimate the conditional median of a
    # zero-inflated, skewed quantity, what volume MAE rewards; "squared" its mean (umask/losses.py).
    volume_error: str = "absolute"
    consistency_weight: float = 0.1  # lambda of InfoNCE(z_short, z_long)
    infonce_temperature: float = 0.1

    def problems(self) -> list[tuple[str, str]]:
        out = [(k, "must be >= 0") for k in ("category_weight", "region_weight", "activity_weight",
                                              "volume_weight", "consistency_weight")
               if getattr(self, k) < 0]
        if self.infonce_temperature <= 0:
            out.append(("infonce_temperature", "must be positive"))
        if self.volume_error not in ("absolute", "squared"):
            out.append(("volume_error", "must be 'absolute' or 'squared'"))
        return out


@dataclass
class ModelConfig:
    size: str = "tiny"  # the name of the preset in configs/model/ that set these numbers
    hidden: int = 64  # DiT width
    depth: int = 2  # DiT blocks
    heads: int = 4  # hidden / heads must be a power of two >= 16 (the Triton kernel's tiles)
    mlp_ratio: float = 4.0
    user_dim: int = 32  # z_u
    short_view_slots: int = 24  # U-SCOPE short view: the most recent evidence slots it keeps
    attention: str = "evidence_keys"  # mask-guided attention mode of every DiT block
    # DiT tokens also get the user's evidence means at their hour of week / hour of day
    # (umask/hour_prior.py), the input of the hour_of_week baseline.
    hour_prior: bool = False
    # The DiT predicts a correction to the prior's hour-of-week mean instead of x0 itself,
    # so the untrained model starts at the hour_of_week baseline (needs hour_prior).
    prior_residual: bool = False
    # The dense channels' normalisation is no setting: it comes from the feature spec's train
    # statistics (umask/normalization.py).
    # dit: U-MASK (diffusion transformer, adaptive masks); mae: the learned baseline, a
    # masked-autoencoder transformer of the same width and depth with uniform masks (umask/mae.py)
    backbone: str = "dit"
    mask: MaskConfig = field(default_factory=MaskConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def problems(self) -> list[tuple[str, str]]:
        out = [(k, "must be positive") for k in ("hidden", "depth", "heads", "user_dim",
                                                  "short_view_slots")
               if getattr(self, k) <= 0]
        if self.heads > 0 and self.hidden % self.heads:
            out.append(("heads", f"must divide hidden ({self.hidden})"))
        elif self.heads > 0 and self.hidden > 0:
            head_dim = self.hidden // self.heads
            if head_dim < 16 or head_dim & (head_dim - 1):
                out.append(("heads", f"hidden / heads = {head_dim}: the attention kernel needs a "
                                     "power of two >= 16"))
        if self.mlp_ratio <= 0:
            out.append(("mlp_ratio", "must be positive"))
        if self.backbone not in BACKBONES:
            out.append(("backbone", f"must be one of {', '.join(BACKBONES)}"))
        if self.prior_residual and not self.hour_prior:
            out.append(("prior_residual", "needs hour_prior: true (the residual's base is the prior)"))
        if self.attention not in ATTENTION_MODES:
            out.append(("attention", f"must be one of {', '.join(ATTENTION_MODES)}"))
        return out


def model_config_from_dict(data: dict, where: str) -> ModelConfig:
    """A ModelConfig from its dataclasses.asdict form (as an export bundle's manifest holds it).

    Missing keys take their defaults; an unknown key or a non-mapping section is a UserError
    naming `where` and the dotted key, so a manifest from another version fails in one line.
    """
    return _from_dict(ModelConfig, data, where, "model")


def _from_dict(cls, data, where: str, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key {prefix}.{unknown[0]} (written by another version?)")
    values = {}
    for name, value in data.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else known[name].default
        values[name] = (_from_dict(type(default), value, where, f"{prefix}.{name}")
                        if is_dataclass(default) else value)
    return cls(**values)
