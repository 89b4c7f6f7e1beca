"""`u-mask eval`: a checkpoint's completions against the baselines, per task and sparsity bucket.

For every batch of the evaluated split and every task (short, long, cold), the model's own
adaptive mask sampler (task fixed for the whole batch) picks the target window and the
evidence. Every method then completes the same batch from the same evidence:
  umask               the checkpoint's model, DDIM with --steps steps, one run per seed;
  umask_uniform_mask  uniform evidence: as many slots as the adaptive mask took, drawn
                      uniformly from the same candidates, completed by the model of
                      --uniform-checkpoint (trained with model.mask.family=uniform: the
                      ablation of adaptive masking) or, without it, by the same model (an
                      ablation at inference only);
  mae                 with --baseline-checkpoint: the learned baseline (model.backbone=mae,
                      umask/mae.py) trained on the same features, one deterministic pass;
  umask_untrained     the checkpoint's config with freshly initialised dense weights (torch
                      seed train.seed) and the checkpoint's tables: the model before training
                      (with model.prior_residual, exactly its hour prior), so what training
                      adds is visible;
  global_popularity, hour_of_week, hour_of_day, last_observed   umask/baselines.py;
                      popularity is the mean slot of the training split's observed slots
                      (--popularity-batches); hour_of_day is the heuristic of the model's
                      hour prior.
Scored slots are the targets that hold a record. Metrics (umask/metrics.py, method section 6)
are computed over all scored slots of the split, per sparsity bucket of the user's share of
observed slots in the window, once per seed, then averaged over seeds.

app_recall10 (per user, then averaged): the share of the distinct app_ids a user used in the
scored slots that are among the method's 10 top apps. Every method ranks apps by one rule, so
it measures the method's forecast: an app's score is the method's completed usage of the app's
category summed over the target window, times the app's share of its category's records in the
training batches read for popularity. Apps never seen there cannot be ranked and count as
misses. Categories come from the checkpoint's feature spec (its app-to-category map), so the
training data need not be on disk. Sparsity buckets are the spec's edges.

intervals (report.json): intervals[task][bucket][metric][method] is umask minus that method on
each of COMPARED (category Acc@1 and MRR, region Acc@1, volume MAE over the same scored
slots; app Recall@10 over the same user-weeks), the model's values averaged over its seeds,
with a 95 % percentile bootstrap interval that resamples users (umask.metrics.
grouped_bootstrap_interval). The findings call umask "ahead of" or "behind" a method only when
that interval excludes 0 (on volume MAE, lower is better), "within noise of" it otherwise.

Output in --out: report.json (every number), report.md (the tables, the intervals and the
findings) and one PNG per task (grouped bars: buckets x methods, one panel per metric). The
scores over the whole split also go to TensorBoard, at the checkpoint's step, in the run folder
the checkpoint belongs to (else in --out): eval_<split>/<task>/<method>/<metric>.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from trainer.data.batch import Batch
from umask.errors import UserError
from trainer.inference.loading import InferenceModel, load_inference_model
from umask.spec import FeatureMaps, FeatureSpec, bucket_labels

MODEL, UNIFORM, LEARNED, UNTRAINED = "umask", "umask_uniform_mask", "mae", "umask_untrained"
BASELINES = ("global_popularity", "hour_of_week", "hour_of_day", "last_observed")
METHODS = (MODEL, UNIFORM, UNTRAINED, *BASELINES)  # every report's; LEARNED with --baseline-checkpoint
SAMPLED = (MODEL, UNIFORM, UNTRAINED)  # run once per sampler seed; the others are deterministic
# metrics where lower is better; every other metric is higher-is-better
LOWER_IS_BETTER = ("volume_mae", "volume_rmse")
PLOTTED = ("category_acc1", "category_mrr", "region_acc1", "volume_mae", "app_recall10")
COUNTS = ("slots", "app_users")  # per-bucket counts, the same in every seed
HEADLINE = "category_mrr"  # the metric printed per method and of the sparsest-bucket findings
# the metrics with paired intervals and findings; app_recall10 is per user-week, the others per slot
COMPARED = ("category_acc1", "category_mrr", "region_acc1", "volume_mae", "app_recall10")
APP_K = 10  # app_recall@k
# SeedSequence stream prefixes: the masks (with the ablation's uniform evidence) and the DDIM
# noise draw from separate streams; the model and its ablation share each seed's noise
_MASK_STREAM, _SAMPLE_STREAM = 0, 1


@dataclass
class EvalSettings:
    split: str = "test"
    samples: int = 1  # seeds of the DDIM sampler; metrics are averaged over them
    steps: int | None = None  # DDIM steps; None = the checkpoint's model.diffusion.sample_steps
    batches: int | None = None  # evaluate at most this many batches; None = the whole split
    batch_size: int = 32
    seed: int = 0
    popularity_batches: int = 50  # training-split batches the global popularity profile reads


@dataclass
class TrainingPrior:
    """What the baselines and the app ranking know of the training split."""

    profile: Tensor  # [F] the mean observed slot (global popularity)
    app_ids: Tensor  # [V] int64, sorted: the apps seen in the training batches read
    app_category: Tensor  # [V] int64, category channel of each app (C = unknown)
    app_share: Tensor  # [V] the app's share of its category's app records


class ScoredRows:
    """The scored slots of one (task, method, seed) over the split: prediction and truth
    rows [S,F], the sparsity share [S] and the user_id [S] of the user each slot belongs to;
    and per user with used apps, app recall and the user's share."""

    def __init__(self):
        self.prediction: list[Tensor] = []
        self.truth: list[Tensor] = []
        self.share: list[Tensor] = []
        self.user: list[Tensor] = []
        self.app_recall: list[Tensor] = []
        self.user_share: list[Tensor] = []
        self.recall_user: list[Tensor] = []

    def add_users(self, app_recall: Tensor, share: Tensor, user: Tensor | None = None) -> None:
        """app_recall [B] (NaN for users without used apps in scored slots), share [B], user [B]
        (the user_id of each row; needed for paired intervals)."""
        self.app_recall.append(app_recall)
        self.user_share.append(share)
        if user is not None:
            self.recall_user.append(user)

    def add(self, prediction: Tensor, truth: Tensor, scored: Tensor, share: Tensor, user: Tensor) -> None:
        """prediction, truth [B,T,F]; scored [B,T] bool; share, user [B]."""
        self.prediction.append(prediction[scored])
        self.truth.append(truth[scored])
        self.share.append(share[:, None].expand_as(scored)[scored])
        self.user.append(user[:, None].expand_as(scored)[scored])

    def category_reciprocal_ranks(self, num_categories: int) -> Tensor:
        """The reciprocal rank of each scored slot's true category (what category_mrr averages); [S]."""
        from umask.metrics import reciprocal_rank

        categories = slice(0, num_categories + 1)
        truth = torch.cat(self.truth)[:, categories].argmax(1)
        return reciprocal_rank(torch.cat(self.prediction)[:, categories], truth)

    def slot_scores(self, spec: FeatureSpec) -> dict[str, Tensor]:
        """Per scored slot [S]: category hit@1 and reciprocal rank, region hit@1, volume
        absolute error (umask.metrics.slot_scores), and per user-week [U]: app_recall10."""
        from umask.metrics import slot_scores

        out = slot_scores(torch.cat(self.prediction), torch.cat(self.truth), spec.num_categories,
                          spec.num_regions)
        out[f"app_recall{APP_K}"] = torch.cat(self.app_recall).double()
        return out

    def metrics(self, spec: FeatureSpec) -> dict[str, dict[str, float]]:
        """completion metrics per sparsity bucket of the spec, plus "all" and app recall."""
        from umask.metrics import completion_metrics_by_sparsity, sparsity_bucket

        # each scored slot becomes a one-slot "user" so the bucket metrics apply row by row
        prediction = torch.cat(self.prediction)[:, None, :]  # [S,1,F]
        truth = torch.cat(self.truth)[:, None, :]
        share = torch.cat(self.share)  # [S]
        scored = torch.ones(share.shape[0], 1, dtype=torch.bool)
        report = completion_metrics_by_sparsity(prediction, truth, scored, share, spec.num_categories,
                                                spec.num_regions, spec.sparsity_edges)
        recall = torch.cat(self.app_recall)  # [U]
        bucket = sparsity_bucket(torch.cat(self.user_share), spec.sparsity_edges)
        for index, label in enumerate(["all", *bucket_labels(spec.sparsity_edges)]):
            rows = ~recall.isnan() & ((bucket == index - 1) if index else True)
            report[label]["app_users"] = int(rows.sum())
            report[label][f"app_recall{APP_K}"] = float(recall[rows].mean()) if rows.any() else math.nan
        return report


def seeds_of(method: str, settings: EvalSettings) -> range:
    """The sampler seeds a method is run with: --samples for the diffusion models (SAMPLED), one
    for the deterministic ones."""
    return range(settings.samples if method in SAMPLED else 1)


def seed_of(*parts: int) -> int:
    """A torch seed from several integers (seed, batch, task, ...) without collisions."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def uniform_evidence(candidates: Tensor, budget: Tensor, generator: torch.Generator) -> Tensor:
    """Exactly budget[b] slots of row b's candidates, uniformly without replacement; [B,T] bool."""
    from umask.masking import gumbel_top_k

    p = candidates.float() / candidates.sum(1, keepdim=True).clamp(min=1)
    return gumbel_top_k(p, budget, generator)


def training_prior(features: Path, spec: FeatureSpec, maps: FeatureMaps, batches: int,
                   batch_size: int, seed: int) -> TrainingPrior:
    """Mean observed slot and app frequencies over the first `batches` training batches; apps
    are put in categories by the spec's map (unlisted apps: the unknown category C)."""
    from trainer.data.loader import ShardedLoader
    from umask.baselines import popularity_profile

    sums, count, app_values = None, 0.0, []
    with ShardedLoader(features, 0, 1, batch_size, seed, splits=("train",), epochs=1,
                       shuffle=False) as loader:
        for index, batch in enumerate(loader):
            if index == batches:
                break
            n = float(batch.observed.sum())
            part = popularity_profile(batch.dense, batch.observed) * n
            sums, count = (part if sums is None else sums + part), count + n
            app_values.append(batch.app_values.numpy())
    ids, counts = np.unique(np.concatenate(app_values), return_counts=True)
    category = maps.category(ids, spec)  # [V] in [0, C]
    per_category = np.bincount(category, weights=counts, minlength=spec.num_categories + 1)
    return TrainingPrior(profile=sums / max(count, 1.0), app_ids=torch.from_numpy(ids),
                         app_category=torch.from_numpy(category),
                         app_share=torch.from_numpy(counts / per_category[category]).float())


def used_apps(batch: Batch, scored: Tensor, app_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Which known apps [B,V] bool each user used in its scored slots, and how many distinct
    apps [B] it used there in all (known or not)."""
    batch_size, slots = scored.shape
    slot_of_value = torch.repeat_interleave(torch.arange(batch_size * slots), batch.app_lengths.long())
    keep = scored.reshape(-1)[slot_of_value]
    row, value = slot_of_value[keep] // slots, batch.app_values[keep]  # [N] user row and app id
    pairs = torch.unique(torch.stack([row, value], 1), dim=0)  # [P,2] distinct (user, app)
    user, app = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    total = torch.bincount(user, minlength=batch_size)
    at = torch.searchsorted(app_ids, app).clamp(max=max(len(app_ids) - 1, 0))
    known = app_ids[at] == app
    relevant = torch.zeros(batch_size, len(app_ids), dtype=torch.bool)
    relevant[user[known], at[known]] = True
    return relevant, total


def app_recall(scores: Tensor, relevant: Tensor, total: Tensor, k: int = APP_K) -> Tensor:
    """Per user: relevant apps among the top k of scores [B,V], over all `total` [B] apps the
    user used (apps outside the V scored ones are misses); NaN when total is 0. [B]"""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [B,k]
    hits = relevant.gather(1, top).sum(1).float()
    return torch.where(total > 0, hits / total.clamp(min=1).float(), torch.full_like(hits, math.nan))


def check_uniform_model(inference: InferenceModel, uniform: InferenceModel) -> None:
    """The ablation's model must read the same slots and have been trained with uniform masks."""
    family = uniform.cfg.model.mask.family
    if family != "uniform":
        raise UserError(f"--uniform-checkpoint {uniform.checkpoint} was trained with "
                        f"model.mask.family={family}; the ablation needs a run trained with "
                        "model.mask.family=uniform")
    if uniform.spec.digest != inference.spec.digest:
        raise UserError(f"--uniform-checkpoint {uniform.checkpoint} was trained on features of another "
                        f"feature spec (digest {uniform.spec.digest[:12]}) than the checkpoint "
                        f"({inference.spec.digest[:12]}): train both on the same featurized data")


def check_learned_model(inference: InferenceModel, learned: InferenceModel) -> None:
    """The learned baseline must be a model.backbone=mae run on the same featurized data."""
    if learned.cfg.model.backbone != "mae":
        raise UserError(f"--baseline-checkpoint {learned.checkpoint} was trained with model.backbone="
                        f"{learned.cfg.model.backbone}; the learned baseline is a model.backbone=mae run")
    if learned.spec.digest != inference.spec.digest:
        raise UserError(f"--baseline-checkpoint {learned.checkpoint} was trained on features of another "
                        f"feature spec (digest {learned.spec.digest[:12]}) than the checkpoint "
                        f"({inference.spec.digest[:12]}): train both on the same featurized data")


def untrained_model(inference: InferenceModel) -> torch.nn.Module:
    """The checkpoint's model as training starts it: its config, dense weights freshly drawn
    under torch seed train.seed (the global RNG is left as it was), in eval mode. The trainer
    draws its tables first, so these are not bit-for-bit its step-0 weights; with
    model.prior_residual the zero-initialised output layer makes the completion the hour prior
    whatever the other weights are."""
    from embeddings.tables import pooled_dim
    from umask.backbones import build_model

    cfg = inference.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, inference.spec, sparse_dim=pooled_dim(cfg.embeddings))
    return model.eval().requires_grad_(False)


def evaluate(inference: InferenceModel, features: Path, settings: EvalSettings,
             on_batch: Callable[[int, int], None] | None = None,
             uniform: InferenceModel | None = None, learned: InferenceModel | None = None) -> dict:
    """The report (see the module docstring) as a JSON-ready dict; on_batch(done, total) after
    each batch; uniform: the model trained with uniform masks for the ablation row (default:
    the same); learned: the model.backbone=mae run of the `mae` row (default: no such row).
    The features must have the checkpoint's feature spec (a UserError otherwise)."""
    from trainer.data.loader import ShardedLoader
    from umask.config import TASKS

    model = inference.model
    if uniform is not None:
        check_uniform_model(inference, uniform)
    if learned is not None:
        check_learned_model(inference, learned)
    methods = [MODEL, UNIFORM, *([LEARNED] if learned is not None else []), UNTRAINED, *BASELINES]
    untrained = untrained_model(inference)
    steps = settings.steps or inference.cfg.model.diffusion.sample_steps
    spec = inference.spec
    prior = training_prior(features, spec, inference.maps, settings.popularity_batches,
                           settings.batch_size, settings.seed)
    rows = {(task, method, sample): ScoredRows() for task in TASKS for method in methods
            for sample in seeds_of(method, settings)}
    examples, users = 0, set()
    with ShardedLoader(features, 0, 1, settings.batch_size, settings.seed, splits=(settings.split,),
                       epochs=1, shuffle=False) as loader:
        split_examples = loader.num_examples  # the loader leaves out a last partial batch
        total = min(loader.batches_per_epoch(), settings.batches or loader.batches_per_epoch())
        if loader.spec.digest != spec.digest:
            raise UserError(f"{features}: made under another feature spec (digest {loader.spec.digest[:12]}) "
                            f"than the checkpoint's ({spec.digest[:12]}): "
                            f"{'; '.join(loader.spec.mismatches(asdict(spec))) or 'same settings, other maps'}")
        for index, batch in enumerate(loader):
            if settings.batches is not None and index == settings.batches:
                break
            examples += len(batch)
            users.update(batch.user_id.tolist())
            slot_sparse = inference.slot_sparse(batch)  # [B,T,E]
            models = {MODEL: (model, slot_sparse), UNTRAINED: (untrained, slot_sparse)}
            models[UNIFORM] = models[MODEL] if uniform is None else (uniform.model, uniform.slot_sparse(batch))
            if learned is not None:
                models[LEARNED] = (learned.model, learned.slot_sparse(batch))
            share = batch.observed.float().mean(1)  # [B] the user's share of observed slots
            for task_id, task in enumerate(TASKS):
                _evaluate_task(models, batch, share, prior, task_id, index, steps, settings,
                               {key[1:]: value for key, value in rows.items() if key[0] == task})
            if on_batch is not None:
                on_batch(index + 1, total)
    if examples == 0:
        raise UserError(f"{features}: split '{settings.split}' gave no batch to evaluate")
    per_seed = {(task, method): [rows[(task, method, s)] for s in seeds_of(method, settings)]
                for task in TASKS for method in methods}
    tasks = {task: {method: _mean_over_samples(
        [seed_rows.metrics(spec) for seed_rows in per_seed[(task, method)]])
        for method in methods} for task in TASKS}
    report = {
        "checkpoint": str(inference.checkpoint), "step": inference.step, "features": str(features),
        "settings": {**asdict(settings), "steps": steps,
                     "uniform_checkpoint": None if uniform is None else str(uniform.checkpoint),
                     "baseline_checkpoint": None if learned is None else str(learned.checkpoint)},
        "split_examples": split_examples,
        "examples": examples, "users": len(users),
        "headline_metric": HEADLINE, "compared_metrics": list(COMPARED), "tasks": tasks,
    }
    report["intervals"] = {task: paired_intervals(
        {method: per_seed[(task, method)] for method in methods}, spec, settings.seed)
        for task in TASKS}
    report["findings"] = findings(tasks, report["intervals"], uniform_trained=uniform is not None)
    return report


def paired_intervals(per_method: dict[str, list[ScoredRows]], spec: FeatureSpec,
                     seed: int) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """umask minus each other method on every metric of COMPARED, paired on the same scored
    slots (app recall: the same user-weeks), the sampled methods' values averaged over their
    seeds, with a 95 % bootstrap interval that resamples users:
    {"all" or bucket: {metric: {method: {difference, low, high, users}}}}."""
    from umask.metrics import grouped_bootstrap_intervals, sparsity_bucket

    def mean_scores(method: str) -> dict[str, Tensor]:
        seeds = [r.slot_scores(spec) for r in per_method[method]]
        return {metric: torch.stack([s[metric] for s in seeds]).mean(0) for metric in seeds[0]}

    first = per_method[MODEL][0]
    slot_user, user_row = torch.cat(first.user), torch.cat(first.recall_user)  # [S], [U]
    slot_bucket = sparsity_bucket(torch.cat(first.share), spec.sparsity_edges)  # [S]
    row_bucket = sparsity_bucket(torch.cat(first.user_share), spec.sparsity_edges)  # [U]
    model = mean_scores(MODEL)
    others = {method: mean_scores(method) for method in per_method if method != MODEL}
    out = {}
    for index, label in enumerate(["all", *bucket_labels(spec.sparsity_edges)]):
        out[label] = {}
        for metric in COMPARED:
            per_user_row = metric == f"app_recall{APP_K}"
            group, bucket = (user_row, row_bucket) if per_user_row else (slot_user, slot_bucket)
            rows = (bucket == index - 1) if index else torch.ones_like(group, dtype=torch.bool)
            rows = rows & ~model[metric].isnan()
            differences = torch.stack([model[metric] - scores[metric] for scores in others.values()])
            intervals = grouped_bootstrap_intervals(differences[:, rows], group[rows], seed=seed)
            users = int(torch.unique(group[rows]).numel())
            out[label][metric] = {method: {"difference": mean, "low": low, "high": high, "users": users}
                                  for method, (mean, low, high) in zip(others, intervals)}
    return out


def _evaluate_task(models: dict[str, tuple], batch: Batch, share: Tensor, prior: TrainingPrior,
                   task_id: int, batch_index: int, steps: int, settings: EvalSettings,
                   rows: dict[tuple[str, int], ScoredRows]) -> None:
    """One task on one batch: one mask, every method completes from it, scored rows collected.

    models: (model, slot_sparse [B,T,E]) for MODEL, UNIFORM, UNTRAINED and (when evaluated)
    LEARNED; MODEL's mask sampler picks the target window and evidence for every method."""
    from umask.baselines import (global_popularity, hour_of_day_frequency, hour_of_week_frequency,
                                 last_observed)

    model = models[MODEL][0]
    spec = model.spec
    dense, observed, tow = batch.dense, batch.observed, batch.time_of_week
    generator = torch.Generator().manual_seed(seed_of(_MASK_STREAM, settings.seed, batch_index, task_id))
    task = torch.full((len(batch),), task_id, dtype=torch.long)
    mask = model.sample_mask(dense, observed, tow, generator, task=task)
    uniform = uniform_evidence(mask.candidates, mask.budget, generator)
    scored = mask.target & observed  # [B,T]
    evidence = mask.evidence
    profile = prior.profile
    relevant, total = used_apps(batch, scored, prior.app_ids)  # [B,V], [B]
    completions = {
        ("global_popularity", 0): global_popularity(dense, evidence, profile),
        ("hour_of_week", 0): hour_of_week_frequency(dense, evidence, tow, profile, spec.slots_per_week),
        ("hour_of_day", 0): hour_of_day_frequency(dense, evidence, tow, profile, spec.slots_per_day),
        ("last_observed", 0): last_observed(dense, evidence, profile),
    }
    if LEARNED in models:
        completer, slot_sparse = models[LEARNED]
        completions[(LEARNED, 0)] = completer.complete(dense, evidence, tow, slot_sparse)
    for sample in range(settings.samples):
        for method, method_evidence in ((MODEL, evidence), (UNIFORM, uniform), (UNTRAINED, evidence)):
            noise = torch.Generator().manual_seed(
                seed_of(_SAMPLE_STREAM, settings.seed, sample, batch_index, task_id))
            completer, slot_sparse = models[method]
            completions[(method, sample)] = completer.complete(dense, method_evidence, tow, slot_sparse,
                                                              steps=steps, generator=noise)
    category = slice(0, model.num_categories + 1)
    for key, completed in completions.items():
        rows[key].add(completed, dense, scored, share, batch.user_id)
        usage = (completed[..., category] * mask.target[..., None]).sum(1)  # [B,C+1] over the window
        scores = usage[:, prior.app_category] * prior.app_share  # [B,V]
        rows[key].add_users(app_recall(scores, relevant, total), share, batch.user_id)


def _mean_over_samples(per_sample: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each metric's mean over the seeds; slot counts are the same in every seed."""
    return {bucket: {name: (values[0] if name in COUNTS else float(np.mean(values)))
                     for name, values in ((n, [m[bucket][n] for m in per_sample])
                                          for n in per_sample[0][bucket])}
            for bucket in per_sample[0]}


def better(metric: str, a: float, b: float) -> bool:
    """Whether value a is strictly better than b on `metric` (NaN is never better)."""
    if math.isnan(a) or math.isnan(b):
        return False
    return a < b if metric in LOWER_IS_BETTER else a > b


def verdict(metric: str, interval: dict[str, float]) -> str:
    """"ahead of", "behind" or "within noise of": umask against a method on `metric`, from the
    95 % interval of umask minus that method (lower is better on LOWER_IS_BETTER metrics). Only
    an interval that excludes 0 says ahead or behind; one that holds 0, or none (no users),
    is within the noise."""
    low, high = interval["low"], interval["high"]  # None: NaN read back from report.json
    if low is None or high is None or math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return "within noise of"
    improves = high < 0 if metric in LOWER_IS_BETTER else low > 0
    return "ahead of" if improves else "behind"


def findings(tasks: dict, intervals: dict, uniform_trained: bool = False) -> list[str]:
    """Plain sentences from the paired intervals (paired_intervals per task): per task and metric
    of COMPARED, which methods umask is ahead of, within noise of and behind; per task the
    same on the headline metric in the sparsest bucket with slots; and whether adaptive masks
    are ahead of uniform ones on it (uniform_trained: the uniform row is a model trained with
    uniform masks, else the same weights)."""
    ablation = ("a model trained with uniform masks" if uniform_trained
                else "the same weights, uniform evidence at inference only")
    out = []
    for task, methods in tasks.items():
        for metric in COMPARED:
            out.append(f"{task}: {MODEL} {metric} {methods[MODEL]['all'][metric]:.4f} "
                       + _compared(metric, intervals[task]["all"][metric]))
        buckets = [b for b in methods[MODEL] if b != "all" and methods[MODEL][b]["slots"] > 0]
        if buckets:
            sparsest = buckets[0]
            out.append(f"{task}, sparsest bucket with slots {sparsest}: {MODEL} {HEADLINE} "
                       f"{methods[MODEL][sparsest][HEADLINE]:.4f} "
                       + _compared(HEADLINE, intervals[task][sparsest][HEADLINE]))
        margin = intervals[task]["all"][HEADLINE][UNIFORM]
        out.append(f"{task}: adaptive masks are {verdict(HEADLINE, margin)} uniform masks on {HEADLINE} ({methods[MODEL]['all'][HEADLINE]:.4f} vs "
                   f"{methods[UNIFORM]['all'][HEADLINE]:.4f}{_margin(margin)}; uniform: {ablation})")
    return out


def _compared(metric: str, margins: dict[str, dict[str, float]]) -> str:
    """'is ahead of A (...), B (...); within noise of C (...); behind D (...)'."""
    groups = {}
    for method, margin in margins.items():
        groups.setdefault(verdict(metric, margin), []).append(f"{method}{_margin(margin)}")
    parts = [f"{word} {', '.join(groups[word])}" for word in ("ahead of", "within noise of", "behind")
             if word in groups]
    return "is " + "; ".join(parts)


def _margin(interval: dict[str, float]) -> str:
    return (f" ({interval['difference']:+.4f}, 95% interval [{interval['low']:+.4f}, "
            f"{interval['high']:+.4f}] over {interval['users']} users)")


def markdown_table(report: dict) -> str:
    """Every compared metric per task, bucket and method, then umask minus each method with its
    95 % interval per task, metric and bucket, as Markdown tables."""
    lines = ["| task | users' observed share | slots | method | cat Acc@1 | cat Acc@5 | cat MRR "
             "| region Acc@1 | volume MAE | app R@10 |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for task, methods in report["tasks"].items():
        for bucket in methods[MODEL]:
            slots = methods[MODEL][bucket]["slots"]
            if not slots:
                continue
            for method, buckets in methods.items():
                m = buckets[bucket]
                lines.append(f"| {task} | {bucket} | {slots} | {method} | {m['category_acc1']:.3f} | "
                             f"{m['category_acc5']:.3f} | {m['category_mrr']:.3f} | "
                             f"{m['region_acc1']:.3f} | {m['volume_mae']:.3f} | {m['app_recall10']:.3f} |")
    others = [m for m in next(iter(report["tasks"].values())) if m != MODEL]
    lines += ["", f"{MODEL} minus each method, 95% bootstrap interval over users (volume MAE: "
              "negative is better; * the interval excludes 0):", "",
              "| task | bucket | metric | " + " | ".join(others) + " |", "|---|---|---|" + "---|" * len(others)]
    for task, buckets in report["intervals"].items():
        for bucket, metrics in buckets.items():
            if not report["tasks"][task][MODEL][bucket]["slots"]:
                continue
            for metric, margins in metrics.items():
                cells = [f"{v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
                         + ("" if verdict(metric, v) == "within noise of" else "*")
                         if not math.isnan(v["difference"]) else "-" for v in margins.values()]
                lines.append(f"| {task} | {bucket} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(report: dict) -> list[str]:
    """The few lines `u-mask eval` prints: the headline metric over the whole split per task and
    method as an aligned table (the best of each row marked *), then one line: whom umask is
    behind on which metric, by the paired intervals, and on how many task-metrics some method
    is within noise of it (report.md and report.json have the rest)."""
    methods = list(next(iter(report["tasks"].values())))
    first = f"{HEADLINE}, {report['settings']['split']}"
    width = max(len(first), *(len(t) for t in report["tasks"]))
    lines = [f"{first:<{width}}  " + "  ".join(f"{m:>{max(len(m), 6)}}" for m in methods)]
    for task, scores in report["tasks"].items():
        values = {m: scores[m]["all"][HEADLINE] for m in methods}
        best = max((v for v in values.values() if not math.isnan(v)), default=math.nan)
        lines.append(f"{task:<{width}}  " + "  ".join(
            f"{(f'{v:.3f}*' if v == best else f'{v:.3f} '):>{max(len(m), 6)}}" for m, v in values.items()))
    behind, noisy = [], 0
    for task, buckets in report["intervals"].items():
        for metric, margins in buckets["all"].items():
            words = [(m, verdict(metric, v)) for m, v in margins.items()]
            behind += [f"{task}: {m} on {metric}" for m, word in words if word == "behind"]
            noisy += any(word == "within noise of" for _, word in words)
    cells = len(report["intervals"]) * len(COMPARED)
    lines.append(f"{MODEL} is behind " + ("; ".join(behind) if behind else "no method on any metric")
                 + f" (95% intervals over users); within noise of some method on {noisy} of {cells} "
                 "task-metrics (report.md)")
    return lines


def write_tensorboard(report: dict, folder: Path) -> Path:
    """The scores over the whole split as TensorBoard scalars at the checkpoint's step:
    eval_<split>/<task>/<method>/<metric> for the plotted metrics. Returns the folder."""
    from torch.utils.tensorboard import SummaryWriter

    split = report["settings"]["split"]
    with SummaryWriter(log_dir=str(folder)) as writer:
        for task, methods in report["tasks"].items():
            for method, buckets in methods.items():
                for metric in PLOTTED:
                    value = buckets["all"][metric]
                    if not math.isnan(value):
                        writer.add_scalar(f"eval_{split}/{task}/{method}/{metric}", value, report["step"])
    return folder


def plot_task(task: str, methods: dict, path: Path) -> None:
    """Grouped bars per bucket (x) and method (colour), one panel per plotted metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = list(methods[MODEL])
    names = list(methods)
    x = np.arange(len(buckets))
    width = 0.8 / len(names)
    columns = 3
    rows = -(-(len(PLOTTED) + 1) // columns)  # one more panel for the legend
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    panels = axes.reshape(-1)
    for ax, metric in zip(panels, PLOTTED):
        for i, method in enumerate(names):
            values = [methods[method][b][metric] for b in buckets]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=method)
        ax.set_xticks(x, buckets, rotation=30, fontsize=8)
        ax.set_title(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)", fontsize=10)
    legend = panels[len(PLOTTED)]
    legend.legend(*panels[0].get_legend_handles_labels(), loc="center")
    legend.axis("off")
    for ax in panels[len(PLOTTED) + 1:]:
        ax.axis("off")
    fig.suptitle(f"task {task}: by users' share of observed slots")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(json_ready(report), indent=1) + "\n")
    (out / "report.md").write_text(markdown_table(report) + "\n\n" + "\n".join(
        f"- {line}" for line in report["findings"]) + "\n")
    for task, methods in report["tasks"].items():
        plot_task(task, methods, out / f"{task}.png")


def json_ready(value):
    """NaN (an empty bucket) becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def evaluate_checkpoint(checkpoint: str | Path, out: str | Path, settings: EvalSettings,
                        data: str | Path | None = None, uniform_checkpoint: str | Path | None = None,
                        on_batch: Callable[[int, int], None] | None = None,
                        baseline_checkpoint: str | Path | None = None) -> dict:
    """What `u-mask eval` does: evaluates the checkpoint (a checkpoint or run folder) on
    `settings.split` of `data` (default: the checkpoint config's data.features), with the
    uniform-mask run's model for the ablation row and the learned baseline's run (model.backbone=mae)
    for the mae row when given, and writes report.json, report.md
    and the plots into `out`, and the scores to TensorBoard (report["tensorboard"]: the run
    folder of the checkpoint, else `out`). Returns the report."""
    inference = load_inference_model(checkpoint)
    if settings.steps is not None and settings.steps > inference.cfg.model.diffusion.train_steps:
        raise UserError(f"--steps {settings.steps}: at most model.diffusion.train_steps="
                        f"{inference.cfg.model.diffusion.train_steps}")
    uniform = None if uniform_checkpoint is None else load_inference_model(uniform_checkpoint)
    learned = None if baseline_checkpoint is None else load_inference_model(baseline_checkpoint)
    features = Path(data or inference.cfg.data.features)
    report = evaluate(inference, features, settings, on_batch, uniform, learned)
    run_dir = inference.checkpoint.parent
    report["tensorboard"] = str(run_dir if (run_dir / "config.yaml").is_file() else Path(out))
    write_report(report, Path(out))
    write_tensorboard(report, Path(report["tensorboard"]))
    return report
