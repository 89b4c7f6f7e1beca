"""`u-mask model-info`: parameter counts of the configured model, dense and sparse, without allocating it."""


def model_parameter_counts(cfg) -> dict[str, int]:
    """Dense parts (DeepSpeed's) and tables (TorchRec's), counted on the meta device."""
    import torch

    from embeddings.tables import pooled_dim
    from umask.backbones import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data.feature_spec(), sparse_dim=pooled_dim(cfg.embeddings))
    counts = {f"dense.{k}": v for k, v in model.param_count().items()}
    for name, table in cfg.embeddings.tables().items():
        counts[f"table.{name}"] = table.num_embeddings * table.dim
    return counts
