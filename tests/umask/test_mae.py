"""The learned baseline (umask/mae.py): uniform masks, regression from evidence only, training."""
import torch

from umask.backbones import build_model
from umask.config import ModelConfig
from umask.mae import MaskedAutoencoder
from umask.model import UMask
from umask_batches import SPARSE_DIM, SPEC, make_batch


def make_mae(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden=32, depth=2, heads=2, user_dim=16, backbone="mae", **overrides),
                       SPEC, SPARSE_DIM)


def test_backbone_picks_the_network():
    assert isinstance(make_mae(), MaskedAutoencoder)
    assert isinstance(build_model(ModelConfig(hidden=32, heads=2, user_dim=16), SPEC, SPARSE_DIM), UMask)
    assert ("backbone", "must be one of dit, mae") in ModelConfig(backbone="bert").problems()


def test_masks_are_uniform_whatever_the_mask_family_says():
    model, data = make_mae(), make_batch()
    mask = model.sample_mask(data.dense, data.observed, data.time_of_week, torch.Generator().manual_seed(0))
    uniform = build_model(ModelConfig(hidden=32, heads=2, user_dim=16), SPEC, SPARSE_DIM)
    uniform.cfg.mask.family = "uniform"
    expected = uniform.sample_mask(data.dense, data.observed, data.time_of_week, torch.Generator().manual_seed(0))
    assert model.cfg.mask.family == "adaptive"
    assert torch.equal(mask.evidence, expected.evidence) and torch.equal(mask.target, expected.target)


def test_completion_reads_evidence_only_and_keeps_it():
    model, data = make_mae(), make_batch()
    evidence = data.observed & (torch.arange(data.observed.shape[1]) < 24)
    completed = model.complete(data.dense, evidence, data.time_of_week, data.slot_sparse)
    assert torch.equal(completed[evidence], data.dense[evidence])
    hidden = ~evidence
    changed = data.dense.clone()
    changed[hidden] += 5.0
    sparse = data.slot_sparse.clone()
    sparse[hidden] += 5.0
    again = model.complete(changed, evidence, data.time_of_week, sparse)
    assert torch.allclose(again[hidden], completed[hidden], atol=1e-6)  # nothing hidden leaks in


def test_the_loss_is_the_regression_of_scored_targets_and_training_lowers_it():
    model, data = make_mae(hour_prior=True, prior_residual=True), make_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        out = model(data.dense, data.observed, data.time_of_week, data.slot_sparse,
                    generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert out["consistency"].item() == 0.0 and out["scored_slots"] > 0
    assert losses[-1] < 0.7 * losses[0]
