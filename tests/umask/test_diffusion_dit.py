"""Noise schedule, DDIM sampler and the DiT: hand-checked numbers and structural invariants."""
import math

import pytest
import torch

from umask.config import DiffusionConfig
from umask.diffusion import Diffusion, alphas_cumprod
from umask.dit import DiT
from umask_batches import CHANNELS, SPARSE_DIM, make_batch


def test_cosine_schedule_matches_its_formula():
    abar = alphas_cumprod(DiffusionConfig(train_steps=200))
    f = lambda t: math.cos((t / 200 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abar[0].item() == pytest.approx(f(1) / f(0), rel=1e-9)
    assert abar[99].item() == pytest.approx(f(100) / f(0), rel=1e-9)
    assert (abar[1:] < abar[:-1]).all() and abar[-1] < 1e-3


def test_linear_schedule_is_the_product_of_one_minus_beta():
    abar = alphas_cumprod(DiffusionConfig(train_steps=3, schedule="linear", linear_beta_start=0.1,
                                          linear_beta_end=0.3, sample_steps=2))
    assert abar.tolist() == pytest.approx([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7])


def test_add_noise_mixes_by_abar():
    diffusion = Diffusion(DiffusionConfig(train_steps=3, schedule="linear", linear_beta_start=0.1,
                                          linear_beta_end=0.3, sample_steps=2))
    x0, noise = torch.ones(1, 2, 1), torch.full((1, 2, 1), 2.0)
    x_t = diffusion.add_noise(x0, torch.tensor([1]), noise)
    assert x_t.flatten().tolist() == pytest.approx([math.sqrt(0.72) + 2 * math.sqrt(0.28)] * 2, rel=1e-6)


def test_ddim_with_a_perfect_predictor_returns_the_truth_and_keeps_evidence():
    diffusion = Diffusion(DiffusionConfig())
    truth = torch.randn(2, 10, 3)
    evidence = torch.rand(2, 10) < 0.4
    evidence_values = torch.where(evidence[..., None], truth, torch.zeros_like(truth))
    seen_steps = []

    def oracle(x_t, t):
        seen_steps.append(int(t[0]))
        assert torch.equal(x_t[evidence], truth[evidence]), "evidence is re-imposed before every step"
        return truth

    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    out = diffusion.ddim_from_noise(oracle, evidence_values, evidence, noise, diffusion.ddim_timesteps(5))
    assert seen_steps == [199, 149, 100, 50, 0]
    torch.testing.assert_close(out, truth)
    assert torch.equal(out[evidence], truth[evidence])


@pytest.mark.parametrize("steps", [0, 201])
def test_ddim_refuses_a_step_count_outside_the_schedule(steps):
    with pytest.raises(ValueError, match=r"steps must be in \[1, 200\]"):
        Diffusion(DiffusionConfig()).ddim_timesteps(steps)


def make_dit(depth=2, attention="evidence_keys"):
    torch.manual_seed(0)
    return DiT(CHANNELS, SPARSE_DIM, user_dim=8, hidden=32, depth=depth, heads=2, mlp_ratio=2.0,
               attention=attention, slots_per_day=24)


def dit_inputs(seed=0):
    data = make_batch(2, 24, 0.7, seed=seed)
    g = torch.Generator().manual_seed(seed)
    evidence = data.observed & (torch.rand(2, 24, generator=g) < 0.5)
    x_t = torch.randn(2, 24, CHANNELS, generator=g)
    return [x_t, torch.tensor([5, 150]), torch.randn(2, 8, generator=g), data.dense, evidence,
            data.time_of_week, data.slot_sparse]


def test_adaln_zero_makes_a_fresh_dit_output_zero():
    out = make_dit()(*dit_inputs())
    assert out.shape == (2, 24, CHANNELS)
    assert torch.equal(out, torch.zeros_like(out))


def randomize_zero_init(dit):
    """Gives the zero-initialised adaLN and output layers weights so the blocks do something."""
    g = torch.Generator().manual_seed(1)
    for name, parameter in dit.named_parameters():
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            parameter.data = torch.randn(parameter.shape, generator=g) * 0.1


@pytest.mark.parametrize("attention", ["evidence_keys", "evidence_causal", "bias"])
def test_dit_is_equivariant_to_slot_order(attention):
    """Slots carry their time of week with them, so shuffling slots shuffles the output:
    the evidence-first sort inside the DiT is undone exactly."""
    dit = make_dit(attention=attention)
    randomize_zero_init(dit)
    x_t, t, z, dense, evidence, tow, sparse = dit_inputs()
    out = dit(x_t, t, z, dense, evidence, tow, sparse)
    assert out.abs().sum() > 0
    order = torch.randperm(24, generator=torch.Generator().manual_seed(2))
    shuffled = dit(x_t[:, order], t, z, dense[:, order], evidence[:, order], tow[:, order], sparse[:, order])
    torch.testing.assert_close(shuffled, out[:, order], atol=1e-5, rtol=1e-5)


def test_evidence_keys_mode_hides_other_generated_slots_from_a_target():
    """In evidence_keys mode a generated slot attends to evidence and itself only, so another
    generated slot's noisy input cannot reach it."""
    dit = make_dit(attention="evidence_keys")
    randomize_zero_init(dit)
    x_t, t, z, dense, evidence, tow, sparse = dit_inputs()
    generated = (~evidence[0]).nonzero().flatten()
    first, other = generated[0], generated[1]
    out = dit(x_t, t, z, dense, evidence, tow, sparse)
    x_t2 = x_t.clone()
    x_t2[0, other] += 3.0
    out2 = dit(x_t2, t, z, dense, evidence, tow, sparse)
    torch.testing.assert_close(out2[0, first], out[0, first])
    assert not torch.allclose(out2[0, other], out[0, other])


def test_training_steps_can_be_the_samplers_own():
    generator = torch.Generator().manual_seed(0)
    one = Diffusion(DiffusionConfig(sample_steps=1, train_on_sample_steps=True))
    assert one.training_steps(16, generator, torch.device("cpu")).tolist() == [199] * 16
    three = Diffusion(DiffusionConfig(sample_steps=3, train_on_sample_steps=True))
    drawn = three.training_steps(64, generator, torch.device("cpu"))
    assert set(drawn.tolist()) == set(three.ddim_timesteps(3)) == {0, 100, 199}
    everywhere = Diffusion(DiffusionConfig(sample_steps=1)).training_steps(256, generator, torch.device("cpu"))
    assert len(set(everywhere.tolist())) > 100
