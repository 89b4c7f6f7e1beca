"""`u-mask eval` and checkpoint loading: metrics on hand-computed cases, baselines on a dataset
whose right answers are known, the command end to end on a checkpoint built in the trainer's
format (tests/trainer/conftest.py built_checkpoint; no training, so the model is untrained)."""
import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.data.schema import EXAMPLES
from umask.spec import DenseLayout, FeatureMaps, FeatureSpec, load_spec, save_spec
from umask.errors import UserError
from trainer.cli import main as cli_main
from trainer.data.batch import Batch
from trainer.inference.evaluate import (COMPARED, METHODS, MODEL, UNIFORM, UNTRAINED, EvalSettings,
                                        ScoredRows, app_recall, evaluate, findings, json_ready, paired_intervals,
                                        uniform_evidence, used_apps, verdict)
from trainer.inference.loading import load_inference_model, resolve_checkpoint
from umask.config import TASKS

C, K = 20, 32  # the tiny preset's layout, F = 56
LAYOUT = DenseLayout(C, K)
T = 168


def run_eval(*argv: str) -> int:
    return cli_main(["eval", *argv])


# --- metrics and masks by hand --------------------------------------------------------------

def one_hot_slot(category: int, region: int, volume: float) -> torch.Tensor:
    slot = torch.zeros(LAYOUT.num_channels)
    slot[category] = 1.0
    slot[LAYOUT.region.start + region] = 1.0
    slot[LAYOUT.volume] = volume
    return slot


def test_scored_rows_pool_slots_over_batches_and_bucket_by_user_share():
    rows = ScoredRows()
    # batch 1: user A (share 0.04, bucket 0) with 2 slots, one scored; truth category 3
    truth = torch.stack([one_hot_slot(3, 1, 5.0), one_hot_slot(3, 1, 5.0)])[None]  # [1,2,F]
    pred = torch.stack([one_hot_slot(3, 2, 6.0), one_hot_slot(0, 1, 0.0)])[None]
    rows.add(pred, truth, torch.tensor([[True, False]]), torch.tensor([0.04]), torch.tensor([101]))
    # batch 2: user B (share 0.9, last bucket), both slots scored: categories ranked 2nd and 1st
    truth = torch.stack([one_hot_slot(4, 0, 2.0), one_hot_slot(5, 0, 2.0)])[None]
    first = one_hot_slot(4, 0, 3.0)
    first[7] = 2.0  # category 7 outranks the true 4: rank 2
    pred = torch.stack([first, one_hot_slot(5, 3, 0.0)])[None]
    rows.add(pred, truth, torch.tensor([[True, True]]), torch.tensor([0.9]), torch.tensor([102]))
    rows.add_users(torch.tensor([0.5, math.nan]), torch.tensor([0.04, 0.2]))  # 2nd user: no apps
    rows.add_users(torch.tensor([0.25]), torch.tensor([0.9]))
    report = rows.metrics(KNOWN_SPEC)
    everything = report["all"]
    assert everything["slots"] == 3
    assert everything["category_acc1"] == pytest.approx(2 / 3)
    assert everything["category_mrr"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    assert everything["region_acc1"] == pytest.approx(1 / 3)  # only B's first slot
    assert everything["volume_mae"] == pytest.approx((1 + 1 + 2) / 3)
    assert report["[0, 0.05]"]["slots"] == 1 and report["[0, 0.05]"]["region_acc1"] == 0.0
    assert report["(0.5, 1]"]["slots"] == 2 and report["(0.5, 1]"]["category_acc1"] == 0.5
    assert report["(0.05, 0.15]"]["slots"] == 0 and math.isnan(report["(0.05, 0.15]"]["category_acc1"])
    assert (everything["app_users"], everything["app_recall10"]) == (2, pytest.approx(0.375))
    assert report["(0.15, 0.3]"]["app_users"] == 0 and math.isnan(report["(0.15, 0.3]"]["app_recall10"])
    assert report["(0.5, 1]"]["app_recall10"] == 0.25
    assert rows.category_reciprocal_ranks(C).tolist() == [1.0, 0.5, 1.0]
    assert torch.cat(rows.user).tolist() == [101, 102, 102]


def test_used_apps_and_app_recall_by_hand():
    # 2 users x 3 slots; bags per slot (batch-major): u0: [5, 9], [5], [7]; u1: [], [9, 11], [3]
    batch = Batch(user_id=torch.tensor([0, 1]), window_start=torch.zeros(2, dtype=torch.long),
                  split=torch.zeros(2, dtype=torch.long), time_of_week=torch.zeros(2, 3, dtype=torch.long),
                  observed=torch.ones(2, 3, dtype=torch.bool), dense=torch.zeros(2, 3, 1),
                  app_values=torch.tensor([5, 9, 5, 7, 9, 11, 3]),
                  app_lengths=torch.tensor([2, 1, 1, 0, 2, 1], dtype=torch.int32),
                  loc_values=torch.zeros(0, dtype=torch.long), loc_lengths=torch.zeros(6, dtype=torch.int32))
    scored = torch.tensor([[True, True, False], [False, True, True]])
    known = torch.tensor([3, 5, 7, 9])  # sorted; 11 is unknown
    relevant, total = used_apps(batch, scored, known)
    assert relevant.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert total.tolist() == [2, 3]  # u0: {5, 9}; u1: {9, 11, 3}
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.3, 0.2, 0.1, 0.0]])
    # top 2: u0 -> 5, 7: one of {5, 9}; u1 -> 3, 5: one of {9, 11, 3}
    assert app_recall(scores, relevant, total, k=2).tolist() == pytest.approx([1 / 2, 1 / 3])
    assert math.isnan(app_recall(scores, relevant, torch.tensor([0, 3]), k=2)[0])


def test_uniform_evidence_takes_the_budget_from_the_candidates_only():
    candidates = torch.tensor([[True, False, True, True, False, True],
                               [False, False, True, False, False, False],
                               [False] * 6])
    budget = torch.tensor([3, 1, 0])
    for seed in range(20):
        evidence = uniform_evidence(candidates, budget, torch.Generator().manual_seed(seed))
        assert torch.equal(evidence.sum(1), budget)
        assert not (evidence & ~candidates).any()
    # uniform: each of row 0's 4 candidates is drawn 3/4 of the time
    hits = sum(uniform_evidence(candidates, budget, torch.Generator().manual_seed(s))[0].float()
               for s in range(400))
    assert torch.allclose(hits[[0, 2, 3, 5]] / 400, torch.full((4,), 0.75), atol=0.07)


def test_findings_say_ahead_or_behind_only_when_the_interval_excludes_0():
    def metrics(value):
        return {"all": {m: value for m in COMPARED} | {"slots": 5},
                "[0, 0.05]": {m: value for m in COMPARED} | {"slots": 5}}
    tasks = {"cold": {MODEL: metrics(0.5), UNIFORM: metrics(0.6), "hour_of_week": metrics(0.7)}}
    ahead = {"difference": 0.2, "low": 0.1, "high": 0.3, "users": 4}
    behind = {"difference": -0.2, "low": -0.3, "high": -0.1, "users": 4}
    noisy = {"difference": 0.05, "low": -0.03, "high": 0.16, "users": 9}
    margins = {UNIFORM: noisy, "hour_of_week": behind}
    intervals = {"cold": {label: {m: margins for m in COMPARED} for label in ("all", "[0, 0.05]")}}
    lines = findings(tasks, intervals)
    assert len(lines) == len(COMPARED) + 2
    assert lines[1] == ("cold: umask category_mrr 0.5000 is within noise of umask_uniform_mask (+0.0500, 95% "
                        "interval [-0.0300, +0.1600] over 9 users); behind hour_of_week (-0.2000, 95% interval "
                        "[-0.3000, -0.1000] over 4 users)")
    assert lines[-2].startswith("cold, sparsest bucket with slots [0, 0.05]: umask category_mrr 0.5000 is within "
                                "noise of umask_uniform_mask")
    assert lines[-1].startswith("cold: adaptive masks are within noise of uniform masks on category_mrr "
                                "(0.5000 vs 0.6000 (+0.0500")
    assert lines[-1].endswith("uniform: the same weights, uniform evidence at inference only)")
    assert findings(tasks, intervals, uniform_trained=True)[-1].endswith("uniform: a model trained with uniform masks)")
    # volume MAE: lower is better, so a negative difference whose interval excludes 0 is ahead
    assert verdict("volume_mae", behind) == "ahead of" and verdict("category_mrr", behind) == "behind"
    assert verdict("volume_mae", ahead) == "behind" and verdict("region_acc1", ahead) == "ahead of"
    assert verdict("app_recall10", noisy) == "within noise of"
    assert verdict("category_acc1", {"difference": math.nan, "low": math.nan, "high": math.nan}) == "within noise of"


def scored_rows(prediction_category: torch.Tensor, truth_category: torch.Tensor, volume: torch.Tensor,
                recall: torch.Tensor, users: torch.Tensor) -> ScoredRows:
    """One batch of one-slot user-weeks: category and region predicted as given, truth as given."""
    rows = ScoredRows()
    pred = torch.stack([one_hot_slot(int(c), int(c) % K, float(v)) for c, v in zip(prediction_category, volume)])
    truth = torch.stack([one_hot_slot(int(c), int(c) % K, 1.0) for c in truth_category])
    share = torch.full((len(users),), 0.9)
    rows.add(pred[:, None], truth[:, None], torch.ones(len(users), 1, dtype=torch.bool), share, users)
    rows.add_users(recall, share, users)
    return rows


def test_paired_intervals_exclude_0_for_a_known_difference_and_hold_it_for_identical_methods():
    g = torch.Generator().manual_seed(0)
    users = torch.arange(60)
    truth = torch.randint(0, C, (60,), generator=g)
    noise = torch.rand(60, generator=g)
    good = scored_rows(truth, truth, 1.0 + 0.1 * noise, 0.5 + 0.3 * noise, users)  # right on every slot
    wrong = torch.where(torch.rand(60, generator=g) < 0.5, truth, (truth + 1) % C)  # right on about half
    bad = scored_rows(wrong, truth, 2.0 + noise, 0.2 * noise, users)
    same = scored_rows(truth, truth, 1.0 + 0.1 * noise, 0.5 + 0.3 * noise, users)
    out = paired_intervals({MODEL: [good], "bad": [bad], "same": [same]}, KNOWN_SPEC, seed=0)["all"]
    for metric in COMPARED:
        assert verdict(metric, out[metric]["bad"]) == "ahead of", metric
        assert out[metric]["same"]["low"] <= 0 <= out[metric]["same"]["high"], metric
        assert verdict(metric, out[metric]["same"]) == "within noise of"
        assert out[metric]["bad"]["users"] == 60
    assert out["volume_mae"]["bad"]["high"] < 0  # umask's error is the smaller one
    assert out["category_acc1"]["bad"]["difference"] == pytest.approx(float((wrong != truth).float().mean()))


# --- baselines on a dataset whose answers are known ----------------------------------------

NOISE_CATEGORY, NOISE_APPS = 9, list(range(3000, 3012))


def write_examples(folder: Path, split: str, users: list[tuple[int, int, int, float, int]]) -> None:
    """users: (user_id, category, region, volume, every) - the user is seen in every `every`-th
    slot of one week, always with the same category (app 1000 + category), region and volume.
    Training users also use the 12 apps of NOISE_CATEGORY (log1p usage 2.0) in every slot; test
    users also use an app of their own (2000 + user_id) that no training user has."""
    columns = {name: [] for name in EXAMPLES.names}
    for user_id, category, region, volume, every in users:
        observed = np.arange(T) % every == 0
        dense = np.zeros((T, LAYOUT.num_channels), np.float32)
        dense[observed, category] = math.log1p(1)
        dense[observed, LAYOUT.region.start + region] = 1.0
        dense[observed, LAYOUT.activity] = math.log1p(1)
        dense[observed, LAYOUT.volume] = volume
        bag = [1000 + category] + ([2000 + user_id] if split == "test" else NOISE_APPS)
        if split == "train":
            dense[observed, NOISE_CATEGORY] = 2.0
        lengths = observed.astype(np.int32) * len(bag)
        columns["user_id"].append(user_id)
        columns["split"].append(split)
        columns["window_start"].append(345_600)
        columns["time_of_week"].append(list(range(T)))
        columns["observed"].append(observed.tolist())
        columns["dense"].append(dense.reshape(-1).tolist())
        columns["app_ids"].append(bag * int(observed.sum()))
        columns["app_lengths"].append(lengths.tolist())
        columns["loc_ids"].append([500 + region] * int(observed.sum()))
        columns["loc_lengths"].append(observed.astype(np.int32).tolist())
    path = folder / f"split={split}" / "shard=00000" / "part-00000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=EXAMPLES), path)


@pytest.fixture(scope="module")
def known_dataset(tmp_path_factory) -> Path:
    """Training users: 3 of category 2, 2 of category 5, 1 of category 7, all in region 1 with
    volume 10. Test users: all category 7, region 4, volume 12; two seen every slot, two every
    2nd slot."""
    folder = tmp_path_factory.mktemp("known")
    write_examples(folder, "train", [(1, 2, 1, 10.0, 1), (2, 2, 1, 10.0, 1), (3, 2, 1, 10.0, 1),
                                     (4, 5, 1, 10.0, 1), (5, 5, 1, 10.0, 1), (6, 7, 1, 10.0, 1)])
    write_examples(folder, "test", [(11, 7, 4, 12.0, 1), (12, 7, 4, 12.0, 2), (13, 7, 4, 12.0, 1),
                                    (14, 7, 4, 12.0, 2)])
    spec = save_spec(folder / "spec", KNOWN_SPEC, KNOWN_MAPS)
    (folder / "manifest.json").write_text(json.dumps({"spec_digest": spec.digest}))
    return folder


# the known dataset's feature spec: the tiny preset's time grid and layout, and its own app map
KNOWN_SPEC = FeatureSpec(slot_seconds=3600, slots=T, num_categories=C, num_regions=K)
KNOWN_MAPS = FeatureMaps(np.array([1002, 1005, 1007, *NOISE_APPS]),
                         np.array([2, 5, 7] + [NOISE_CATEGORY] * 12, np.int32),
                         np.empty(0, np.int64), np.empty(0, np.int32))


@pytest.fixture(scope="module")
def inference(built_checkpoint, known_dataset):
    """The built checkpoint, as if trained on features of the known dataset's spec."""
    loaded = load_inference_model(built_checkpoint[1])
    return dataclasses.replace(loaded, spec=load_spec(known_dataset / "spec"), _maps=KNOWN_MAPS)


def test_baselines_get_the_known_answers(inference, known_dataset):
    report = evaluate(inference, known_dataset, EvalSettings(batch_size=2, steps=2))
    assert report["examples"] == 4 and report["users"] == 4
    for task in TASKS:
        methods = report["tasks"][task]
        slots = methods[MODEL]["all"]["slots"]
        assert slots > 0 and all(methods[m]["all"]["slots"] == slots for m in METHODS)
        # untrained with the prior residual (the tiny preset), the model completes as its hour prior
        assert methods[UNTRAINED]["all"]["category_mrr"] == methods["hour_of_week"]["all"]["category_mrr"]
        assert {b for b in methods[MODEL] if methods[MODEL][b]["slots"]} == {"all", "(0.3, 0.5]", "(0.5, 1]"}
        popular = methods["global_popularity"]["all"]
        # the mean training slot ranks categories 9 (2.0), 2 (3/6 log 2), 5 (2/6), 7 (1/6): the
        # true 7 is 4th; region 1 is predicted (true: 4) and volume 10 (true: 12)
        assert (popular["category_acc1"], popular["category_acc5"]) == (0.0, 1.0)
        assert popular["category_mrr"] == pytest.approx(1 / 4)
        assert popular["region_acc1"] == 0.0 and popular["volume_mae"] == pytest.approx(2.0)
        # its top 10 apps: 1002, then 9 of the 12 category-9 apps (1/12 of 2.0 each beats
        # 2/6 log 2 of 1005 and 1/6 log 2 of 1007): neither app of a test user
        assert popular["app_recall10"] == 0.0
        for own in ("hour_of_week", "hour_of_day", "last_observed"):  # the user's own evidence is the answer
            m = methods[own]["all"]
            assert (m["category_acc1"], m["category_mrr"], m["region_acc1"]) == (1.0, 1.0, 1.0)
            assert m["volume_mae"] == pytest.approx(0.0, abs=1e-6)
            # 1007 ranks first, the user's own 20xx was never seen in training: 1 of 2
            assert m["app_recall10"] == 0.5
        assert methods[MODEL]["all"]["app_users"] == methods["hour_of_week"]["all"]["app_users"] > 0
        assert all(math.isfinite(methods[m]["all"]["category_mrr"]) for m in (MODEL, UNIFORM))
    assert len(report["findings"]) == (len(COMPARED) + 2) * len(TASKS)
    for task in TASKS:  # the baselines that know each user's answer: umask can only tie or lose
        for own in ("hour_of_week", "hour_of_day", "last_observed"):
            margin = report["intervals"][task]["all"]["category_mrr"][own]
            assert 0 < margin["users"] <= 4 and margin["low"] <= margin["difference"] <= margin["high"] <= 0
            error = report["intervals"][task]["all"]["volume_mae"][own]
            assert error["low"] >= 0  # umask's volume error is at least theirs


def test_evaluation_is_deterministic_under_its_seed(inference, known_dataset):
    settings = EvalSettings(batch_size=2, steps=2, samples=2, seed=5)
    first, second = (evaluate(inference, known_dataset, settings) for _ in range(2))
    assert json_ready(first["tasks"]) == json_ready(second["tasks"])  # NaN (empty bucket) != NaN
    other = evaluate(inference, known_dataset, EvalSettings(batch_size=2, steps=2, samples=2, seed=6))
    assert json_ready(other["tasks"]) != json_ready(first["tasks"])


def test_the_uniform_row_comes_from_the_uniform_checkpoint(inference, known_dataset):
    settings = EvalSettings(batch_size=2, steps=2, seed=3)
    with pytest.raises(UserError, match="trained with model.mask.family=adaptive"):
        evaluate(inference, known_dataset, settings, uniform=inference)
    uniform = copy.deepcopy(inference)
    uniform.cfg.model.mask.family = "uniform"
    uniform.checkpoint = Path("uniform-run")
    with torch.no_grad():
        uniform.model.dit.final_layer.linear.bias.add_(0.5)  # other weights than the checkpoint's
    same = evaluate(inference, known_dataset, settings)
    ablated = evaluate(inference, known_dataset, settings, uniform=uniform)
    assert same["settings"]["uniform_checkpoint"] is None
    assert ablated["settings"]["uniform_checkpoint"] == "uniform-run"
    for task in TASKS:
        assert json_ready(ablated["tasks"][task][MODEL]) == json_ready(same["tasks"][task][MODEL])
        assert ablated["tasks"][task][UNIFORM]["all"] != same["tasks"][task][UNIFORM]["all"]
    assert any("a model trained with uniform masks" in line for line in ablated["findings"])
    uniform.spec = dataclasses.replace(uniform.spec, slot_seconds=1800, slots=336)
    with pytest.raises(UserError, match=r"trained on features of another feature spec"):
        evaluate(inference, known_dataset, settings, uniform=uniform)


def test_features_of_another_spec_are_refused(built_checkpoint, known_dataset):
    # the built checkpoint's spec is the tiny dataset's: same layout, other maps and regions
    with pytest.raises(UserError, match=r"made under another feature spec .*same settings, other maps"):
        evaluate(load_inference_model(built_checkpoint[1]), known_dataset, EvalSettings(batch_size=2))


# --- checkpoint loading ----------------------------------------------------------------------

def test_loading_restores_the_saved_weights_and_tables_exactly(built_checkpoint, inference):
    run, folder, saved = built_checkpoint
    assert resolve_checkpoint(run) == folder and inference.step == 7
    state = inference.model.state_dict()
    assert state.keys() == saved["dense"].keys()
    assert all(torch.equal(state[k], saved["dense"][k]) for k in state)
    for name, weight in saved["tables"].items():
        assert torch.equal(inference.tables.embedding_bags[name].weight, weight)


def test_run_folder_means_its_highest_step(built_checkpoint, tmp_path):
    _, folder, _ = built_checkpoint
    run = tmp_path / "run"
    for name, step in (("checkpoint_b", 3), ("checkpoint_a", 12)):
        (run / name).mkdir(parents=True)
        (run / name / "state.json").write_text(json.dumps({"step": step}))
    assert resolve_checkpoint(run) == run / "checkpoint_a"
    with pytest.raises(UserError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_a_modified_checkpoint_is_refused(built_checkpoint, tmp_path):
    _, folder, _ = built_checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    data = bytearray((copy / "dense.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "dense.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum does not match"):
        load_inference_model(copy)


# --- the command -------------------------------------------------------------------------------

def test_eval_command_writes_report_and_plots(built_checkpoint, tmp_path, capsys):
    run, _, _ = built_checkpoint
    out = tmp_path / "eval"
    assert run_eval("--checkpoint", str(run), "--out", str(out), "--batches", "1", "--steps", "2",
                    "--samples", "2", "--batch-size", "8", "--popularity-batches", "2") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 7 and report["examples"] == 8
    assert report["settings"]["samples"] == 2 and report["settings"]["steps"] == 2
    assert set(report["tasks"]) == set(TASKS)
    assert set(report["tasks"]["short"]) == set(METHODS)
    for task in TASKS:
        assert (out / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out.splitlines()
    # a few lines: category MRR per task and method, the verdicts, then where the rest went
    assert printed[0].split() == ["category_mrr,", "test", *METHODS] and len(printed) == 6
    assert [line.split()[0] for line in printed[1:4]] == ["short", "long", "cold"]
    assert all(len(line.split()) == 1 + len(METHODS) for line in printed[1:4])
    assert printed[4].startswith("umask is behind ") and printed[4].endswith(" task-metrics (report.md)")
    behind = sum(verdict(metric, margin) == "behind" for buckets in report["intervals"].values()
                 for metric, margins in buckets["all"].items() for margin in margins.values())
    assert printed[4].split(" (95% intervals")[0].count(" on ") == behind or (behind == 0 and "behind no method on any metric" in printed[4])
    assert printed[-1].startswith(f"wrote {out / 'report.json'} (8 examples")
    assert (out / "report.md").read_text().startswith("| task |")
    # the run folder holds no config.yaml here (the checkpoint was built, not trained): the
    # scores went to TensorBoard in --out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert report["tensorboard"] == str(out)
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_test/cold/hour_of_week/category_mrr")] == [7]


def test_eval_command_rejects_bad_arguments(built_checkpoint, tmp_path, capsys):
    run, _, _ = built_checkpoint
    assert run_eval("--checkpoint", str(run), "--out", str(tmp_path), "--samples", "0") == 2
    assert "--samples must be positive" in capsys.readouterr().err
    assert run_eval("--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)) == 2
    assert "checkpoint not found" in capsys.readouterr().err


# --- the learned baseline, trained through `u-mask train`'s path -----------------------------

@pytest.mark.slow
def test_the_learned_baseline_trains_on_ray_and_gets_its_row(built_checkpoint, tiny_config, embedded_ray,
                                                             tmp_path, tiny_dataset):
    from trainer.training.launch import train
    from umask.mae import MaskedAutoencoder

    result = train(tiny_config("ray.name=mae", "ray.num_workers=1", "train.steps=3", "train.log_every=1",
                               "train.checkpoint_every=3", "model.backbone=mae"))
    assert result.error is None and result.metrics["step"] == 3
    learned = load_inference_model(tmp_path / "runs" / "mae")
    assert isinstance(learned.model, MaskedAutoencoder) and learned.step == 3
    inference = load_inference_model(built_checkpoint[1])
    report = evaluate(inference, tiny_dataset / "features", EvalSettings(batches=1, batch_size=4, steps=2),
                      learned=learned)
    assert report["settings"]["baseline_checkpoint"] == str(learned.checkpoint)
    for task in TASKS:
        scores = report["tasks"][task]["mae"]["all"]
        assert scores["slots"] == report["tasks"][task][MODEL]["all"]["slots"] > 0
        assert math.isfinite(scores["category_mrr"]) and "mae" in report["intervals"][task]["all"]["volume_mae"]
    with pytest.raises(UserError, match="the learned baseline is a model.backbone=mae run"):
        evaluate(inference, tiny_dataset / "features", EvalSettings(batches=1, batch_size=4), learned=inference)
