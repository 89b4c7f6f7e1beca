"""Evaluation metrics of completed slots (method section 6), as pure functions on tensors.

Ranking metrics take scores [N,V] (higher = more likely) and the true index [N]; slot metrics
read the dense layout [C+1 categories, K+1 regions, activity, volume] and score only the
slots a caller marks (target slots with activity). Empty inputs give NaN, never an error,
so a sparsity bucket without slots shows up as NaN in a report.
"""
import torch
from torch import Tensor

from umask.spec import SPARSITY_EDGES, bucket_labels


def true_rank(scores: Tensor, truth: Tensor) -> Tensor:
    """1-based rank of the true index among the scores, ties counted pessimistically; [N]."""
    true_score = scores.gather(1, truth[:, None].long())  # [N,1]
    return (scores >= true_score).sum(1)


def topk_accuracy(scores: Tensor, truth: Tensor, k: int) -> Tensor:
    """Share of rows whose true index ranks within the top k (Acc@k)."""
    return (true_rank(scores, truth) <= k).float().mean() if len(truth) else _nan()


def reciprocal_rank(scores: Tensor, truth: Tensor) -> Tensor:
    """1 / true_rank per row; [N]."""
    return 1.0 / true_rank(scores, truth).float()


def mean_reciprocal_rank(scores: Tensor, truth: Tensor) -> Tensor:
    return reciprocal_rank(scores, truth).mean() if len(truth) else _nan()


def mean_absolute_error(prediction: Tensor, truth: Tensor) -> Tensor:
    return (prediction - truth).abs().mean() if truth.numel() else _nan()


def root_mean_squared_error(prediction: Tensor, truth: Tensor) -> Tensor:
    return ((prediction - truth) ** 2).mean().sqrt() if truth.numel() else _nan()


def recall_at_k(scores: Tensor, relevant: Tensor, k: int = 10) -> Tensor:
    """Mean over rows with any relevant item of |top-k of scores that are relevant| / |relevant|.

    scores [N,V], relevant [N,V] bool (e.g. the fine-grained app ids used in the window).
    """
    rows = relevant.any(1)
    if not rows.any():
        return _nan()
    scores, relevant = scores[rows], relevant[rows]
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [N',k]
    hits = relevant.gather(1, top).sum(1).float()
    return (hits / relevant.sum(1).float()).mean()


def grouped_bootstrap_interval(difference: Tensor, group: Tensor, draws: int = 2000,
                               level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-slot paired differences [S] and its percentile bootstrap interval.

    Whole groups (group [S], e.g. the user of each slot) are resampled with replacement, not
    slots: a user's slots are not independent of each other. Returns (mean, low, high).
    """
    return grouped_bootstrap_intervals(difference[None], group, draws, level, seed)[0]


def grouped_bootstrap_intervals(differences: Tensor, group: Tensor, draws: int = 2000,
                                level: float = 0.95, seed: int = 0) -> list[tuple[float, float, float]]:
    """grouped_bootstrap_interval for M comparisons on the same slots at once: differences
    [M,S], group [S]; one resampling of the groups (the same for every row, as `seed` makes
    it for separate calls) serves all M. Returns (mean, low, high) per row; NaN when S = 0."""
    if not differences.shape[1]:
        return [(float("nan"),) * 3] * differences.shape[0]
    _, member = torch.unique(group, return_inverse=True)  # [S] group index of each slot
    groups = int(member.max()) + 1
    sums = torch.zeros(differences.shape[0], groups, dtype=torch.float64).index_add_(
        1, member, differences.double())  # [M,G]
    counts = torch.bincount(member, minlength=groups).double()  # [G]
    picks = torch.randint(groups, (draws, groups), generator=torch.Generator().manual_seed(seed))
    resampled = sums[:, picks].sum(-1) / counts[picks].sum(-1)  # [M,draws]
    quantiles = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    bounds = torch.quantile(resampled, quantiles, dim=1)  # [2,M]
    means = sums.sum(1) / counts.sum()
    return [(float(m), float(lo), float(hi)) for m, lo, hi in zip(means, bounds[0], bounds[1])]


def slot_scores(prediction: Tensor, truth: Tensor, num_categories: int, num_regions: int) -> dict[str, Tensor]:
    """Per scored slot, what completion_metrics averages: category hit@1, category reciprocal
    rank, region hit@1 and volume absolute error; prediction, truth [S,F] in the dense layout;
    each value [S] float64. Their means over slots are completion_metrics' category_acc1,
    category_mrr, region_acc1 and volume_mae, so paired differences of them over the same slots
    are differences of those metrics (trainer/inference/evaluate.py, paired intervals)."""
    categories = slice(0, num_categories + 1)
    regions = slice(num_categories + 1, num_categories + num_regions + 2)
    volume = num_categories + num_regions + 3
    category_rank = true_rank(prediction[:, categories], truth[:, categories].argmax(1))
    region_rank = true_rank(prediction[:, regions], truth[:, regions].argmax(1))
    return {"category_acc1": (category_rank <= 1).double(), "category_mrr": 1.0 / category_rank.double(),
            "region_acc1": (region_rank <= 1).double(),
            "volume_mae": (prediction[:, volume] - truth[:, volume]).abs().double()}


def sparsity_bucket(observed_share: Tensor, edges: tuple[float, ...] = SPARSITY_EDGES) -> Tensor:
    """Bucket index per user: 0 for share <= edges[0], ..., len(edges) above the last; [N]."""
    return torch.bucketize(observed_share, torch.tensor(edges, dtype=observed_share.dtype))


def completion_metrics(prediction: Tensor, truth: Tensor, scored: Tensor, num_categories: int,
                       num_regions: int) -> dict[str, float]:
    """Category Acc@1/Acc@5/MRR, region Acc@1, volume MAE/RMSE over the scored slots.

    prediction, truth [B,T,F] in the dense layout; scored [B,T] bool.
    """
    categories = slice(0, num_categories + 1)
    regions = slice(num_categories + 1, num_categories + num_regions + 2)
    volume = num_categories + num_regions + 3
    pred, true = prediction[scored], truth[scored]  # [S,F]
    category_truth = true[:, categories].argmax(1)
    region_truth = true[:, regions].argmax(1)
    return {
        "slots": int(scored.sum()),
        "category_acc1": float(topk_accuracy(pred[:, categories], category_truth, 1)),
        "category_acc5": float(topk_accuracy(pred[:, categories], category_truth, 5)),
        "category_mrr": float(mean_reciprocal_rank(pred[:, categories], category_truth)),
        "region_acc1": float(topk_accuracy(pred[:, regions], region_truth, 1)),
        "volume_mae": float(mean_absolute_error(pred[:, volume], true[:, volume])),
        "volume_rmse": float(root_mean_squared_error(pred[:, volume], true[:, volume])),
    }


def completion_metrics_by_sparsity(prediction: Tensor, truth: Tensor, scored: Tensor,
                                   observed_share: Tensor, num_categories: int, num_regions: int,
                                   edges: tuple[float, ...] = SPARSITY_EDGES) -> dict[str, dict[str, float]]:
    """completion_metrics per sparsity bucket of the users (observed_share [B]), plus "all"."""
    bucket = sparsity_bucket(observed_share, edges)  # [B]
    report = {"all": completion_metrics(prediction, truth, scored, num_categories, num_regions)}
    for index, label in enumerate(bucket_labels(edges)):
        in_bucket = scored & (bucket == index)[:, None]
        report[label] = completion_metrics(prediction, truth, in_bucket, num_categories, num_regions)
    return report


def _nan() -> Tensor:
    return torch.tensor(float("nan"))
