"""The composed UMask: what reaches the loss and the conditioning, completion, overfitting."""
import pytest
import torch

from umask.config import LossConfig, ModelConfig
from umask.model import UMask
from umask_batches import CHANNELS, SPARSE_DIM, SPEC, make_batch


def make_model(**overrides):
    torch.manual_seed(0)
    return UMask(ModelConfig(hidden=32, depth=2, heads=2, user_dim=16, **overrides),
                 SPEC, SPARSE_DIM)


def loss_of(model, data, seed=0, mask=None):
    return model(data.dense, data.observed, data.time_of_week, data.slot_sparse,
                 generator=torch.Generator().manual_seed(seed), mask=mask)


def test_forward_returns_the_loss_and_its_parts():
    model = make_model()
    data = make_batch()
    out = loss_of(model, data)
    assert set(out) == {"loss", "reconstruction", "consistency", "scored_slots", "evidence_slots"}
    expected = out["reconstruction"] + 0.1 * out["consistency"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "key_bias" not in name)


def test_forward_is_deterministic_for_a_generator():
    model = make_model()
    data = make_batch()
    assert torch.equal(loss_of(model, data, 7)["loss"], loss_of(model, data, 7)["loss"])
    assert not torch.equal(loss_of(model, data, 7)["loss"], loss_of(model, data, 8)["loss"])


def perturbed(data, where, amount=3.0):
    dense, sparse = data.dense.clone(), data.slot_sparse.clone()
    dense[where] += amount
    sparse[where] += amount
    return type(data)(dense, data.observed, data.time_of_week, sparse)


def test_targets_never_reach_the_conditioning():
    """Changing target values (dense and sparse) leaves the mask, z_u and the DiT's
    evidence/sparse token inputs, and therefore the completion, unchanged."""
    model = make_model()
    data = make_batch(seed=1)
    mask = model.sample_mask(data.dense, data.observed, data.time_of_week, torch.Generator().manual_seed(0))
    other = perturbed(data, mask.target)
    mask2 = model.sample_mask(other.dense, other.observed, other.time_of_week, torch.Generator().manual_seed(0))
    assert torch.equal(mask2.evidence, mask.evidence) and torch.equal(mask2.target, mask.target)
    z = model.user_embedding(data.dense, mask.evidence, data.time_of_week, data.slot_sparse)
    z2 = model.user_embedding(other.dense, mask.evidence, other.time_of_week, other.slot_sparse)
    assert torch.equal(z, z2)
    x_t = torch.zeros_like(data.dense)
    tokens = model.dit.embedder(x_t, data.dense, mask.evidence, data.time_of_week, data.slot_sparse)
    tokens2 = model.dit.embedder(x_t, other.dense, mask.evidence, other.time_of_week, other.slot_sparse)
    assert torch.equal(tokens, tokens2)
    done = model.complete(data.dense, mask.evidence, data.time_of_week, data.slot_sparse, steps=3,
                          generator=torch.Generator().manual_seed(0))
    done2 = model.complete(other.dense, mask.evidence, other.time_of_week, other.slot_sparse, steps=3,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(done, done2)


@pytest.mark.parametrize("attention", ["evidence_keys", "bias"])
def test_slots_neither_target_nor_evidence_do_not_change_the_loss(attention):
    model = make_model(attention=attention)
    data = make_batch(seed=2)
    mask = model.sample_mask(data.dense, data.observed, data.time_of_week, torch.Generator().manual_seed(0))
    outside = ~mask.target & ~mask.evidence
    assert outside.any()
    base = loss_of(model, data, mask=mask)
    moved = loss_of(model, perturbed(data, outside), mask=mask)
    assert torch.equal(base["loss"], moved["loss"])
    # ... while changing a target value does change it.
    assert not torch.equal(base["reconstruction"], loss_of(model, perturbed(data, mask.target), mask=mask)["reconstruction"])


def test_only_evidence_slots_get_sparse_gradients():
    model = make_model()
    data = make_batch(seed=3)
    data.slot_sparse.requires_grad_(True)
    mask = model.sample_mask(data.dense, data.observed, data.time_of_week, torch.Generator().manual_seed(0))
    loss_of(model, data, mask=mask)["loss"].backward()
    grad_norm = data.slot_sparse.grad.abs().sum(-1)  # [B,T]
    assert torch.equal(grad_norm[~mask.evidence], torch.zeros_like(grad_norm[~mask.evidence]))
    assert (grad_norm[mask.evidence] > 0).any()


def test_complete_keeps_evidence_bit_exactly_and_is_seeded():
    model = make_model()
    torch.nn.init.normal_(model.dit.final_layer.linear.weight)  # a non-zero output
    data = make_batch(seed=4)
    data.dense[..., -1] = torch.rand(data.dense.shape[:2]) * 1e3  # values with many mantissa bits
    evidence = data.observed & (torch.rand(data.observed.shape) < 0.5)
    run = lambda seed: model.complete(data.dense, evidence, data.time_of_week, data.slot_sparse,  # noqa: E731
                                      steps=4, generator=torch.Generator().manual_seed(seed))
    out = run(0)
    assert out.shape == data.dense.shape
    assert torch.equal(out[evidence], data.dense[evidence])
    assert not torch.equal(out[~evidence], data.dense[~evidence])
    assert torch.equal(run(0), out)
    assert not torch.equal(run(1), out)


def test_extra_negatives_enter_the_consistency_loss():
    data = make_batch()
    plain = loss_of(make_model(), data)["consistency"]
    seen = []

    def gather(z):
        seen.append(z.shape)
        return torch.randn(6, z.shape[1], generator=torch.Generator().manual_seed(0))

    model = make_model()
    model.gather_negatives = gather
    with_negatives = loss_of(model, data)["consistency"]
    assert seen == [(4, 16)]
    assert with_negatives > plain


def test_rejects_a_dense_tensor_of_the_wrong_layout():
    data = make_batch()
    with pytest.raises(ValueError, match=rf"dense must be \[B,T,{CHANNELS}\]"):
        make_model()(data.dense[..., :-1], data.observed, data.time_of_week, data.slot_sparse,
                     generator=torch.Generator())


def test_one_batch_overfits():
    # squared error on every channel: absolute error's constant gradient keeps Adam circling
    # the optimum at about the learning rate instead of converging to it
    model = make_model(loss=LossConfig(volume_error="squared"))
    data = make_batch(4, 32, 0.6)
    generator = torch.Generator().manual_seed(0)
    mask = model.sample_mask(data.dense, data.observed, data.time_of_week, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(300):
        out = loss_of(model, data, seed=int(torch.randint(0, 2**31, (1,), generator=generator)), mask=mask)
        first = first if first is not None else out["loss"].item()
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert out["loss"].item() < 0.01 * first
    # mean squared error per channel family, in units of the family's spread (normalization.py)
    assert out["reconstruction"].item() < 1e-2


def test_param_count_on_meta_device_matches_the_real_model():
    with torch.device("meta"):
        meta = make_model()
    counts = make_model().param_count()
    assert meta.param_count() == counts
    assert counts["total"] == counts["uscope"] + counts["dit"] == sum(p.numel() for p in make_model().parameters())


@pytest.mark.gpu
def test_a_cpu_generator_drives_a_cuda_model_like_a_cpu_one():
    model = make_model()
    data = make_batch(seed=5)
    cpu_loss = loss_of(model, data)["loss"]
    cuda = make_model().cuda()
    moved = type(data)(*(t.cuda() for t in (data.dense, data.observed, data.time_of_week, data.slot_sparse)))
    torch.testing.assert_close(loss_of(cuda, moved)["loss"].cpu(), cpu_loss, atol=1e-4, rtol=1e-4)


def test_a_profile_vector_enters_z_u_when_configured():
    torch.manual_seed(0)
    model = UMask(ModelConfig(hidden=32, heads=2, user_dim=16), SPEC, SPARSE_DIM,
                  profile_dim=5)
    data = make_batch(2, 24)
    evidence = data.observed
    profile = torch.randn(2, 5)
    z = model.user_embedding(data.dense, evidence, data.time_of_week, data.slot_sparse, profile)
    z_other = model.user_embedding(data.dense, evidence, data.time_of_week, data.slot_sparse, profile + 1)
    assert z.shape == (2, 16) and not torch.allclose(z, z_other)
    with pytest.raises(ValueError, match="needs `profile`"):
        model.user_embedding(data.dense, evidence, data.time_of_week, data.slot_sparse)


def test_users_without_evidence_get_a_defined_z_u():
    model = make_model()
    data = make_batch(2, 24)
    none = torch.zeros_like(data.observed)
    z = model.user_embedding(data.dense, none, data.time_of_week, data.slot_sparse)
    assert torch.isfinite(z).all()
    done = model.complete(data.dense, none, data.time_of_week, data.slot_sparse, steps=2,
                          generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(done).all()


def test_a_bf16_model_takes_the_loaders_float32_batch():
    model = make_model().to(torch.bfloat16)
    # the schedule keeps float32: in bf16, abar at t=0 (1 - 2.5e-4) would round to 1
    abar = model.diffusion.abar_on(torch.device("cpu"))
    assert abar.dtype == torch.float32 and 2e-4 < 1 - abar[0].item() < 3e-4
    data = make_batch(2, 24)
    out = loss_of(model, data)
    assert out["loss"].dtype == torch.bfloat16 and torch.isfinite(out["loss"])
    out["loss"].backward()
    evidence = data.observed
    done = model.complete(data.dense, evidence, data.time_of_week, data.slot_sparse, steps=2,
                          generator=torch.Generator().manual_seed(0))
    assert done.dtype == torch.float32 and torch.equal(done[evidence], data.dense[evidence])
