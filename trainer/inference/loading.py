"""A trained U-MASK ready for inference in one plain process, loaded from a verified checkpoint.

What `u-mask eval` and `u-mask complete` share: find the checkpoint (a checkpoint folder, or a
run folder meaning its latest one), check every file against the manifests, then rebuild the
run's config from config.yaml, the feature spec from spec/ (the model is sized by it, and its
maps place apps and locations exactly as in training), the dense model from dense.safetensors
and the whole app/loc tables from tables/ (embeddings.checkpoint.load_full_tables). No DeepSpeed, no Ray, no process
group; only YAML, JSON and safetensors are read, so nothing is ever unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from trainer.config import RunConfig, load_config
from trainer.training.checkpoint import latest_checkpoint, verify_checkpoint
from trainer.data.batch import Batch
from umask.spec import SPEC_DIR
from umask.spec import DenseLayout, FeatureMaps, FeatureSpec, load_maps, load_spec
from umask.errors import UserError

if TYPE_CHECKING:  # torchrec and the model are imported where they are used, as on the driver
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from embeddings.ids import IdMapper
    from umask.model import UMask


@dataclass
class InferenceModel:
    """A checkpoint's model and tables in eval mode; `slot_sparse` turns a batch's bags into
    the model's per-slot sparse input."""

    checkpoint: Path
    step: int
    cfg: RunConfig
    spec: FeatureSpec  # the training features' spec
    model: UMask  # or umask.mae.MaskedAutoencoder (model.backbone: mae), with the same interface
    tables: EmbeddingBagCollection  # the full app and loc tables
    ids: IdMapper
    _maps: FeatureMaps | None = field(default=None, repr=False)

    @property
    def layout(self) -> DenseLayout:
        return self.spec.layout

    @property
    def maps(self) -> FeatureMaps:
        """The spec's app-to-category and loc-to-region maps (read on first use)."""
        if self._maps is None:
            self._maps = load_maps(self.checkpoint / SPEC_DIR, self.spec)
        return self._maps

    @torch.no_grad()
    def slot_sparse(self, batch: Batch) -> Tensor:
        """Pooled app + loc embeddings of every slot's bags; [B,T,E]."""
        kjt = self.ids.to_kjt(batch.app_values, batch.app_lengths, batch.loc_values, batch.loc_lengths)
        pooled = self.tables(kjt).values()  # [B*T, E]
        return pooled.view(len(batch), batch.observed.shape[1], -1)


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint folder; for a run folder, its latest complete
    checkpoint (trainer.training.checkpoint.latest_checkpoint: a folder a crash left partial is
    passed over), or, when none is complete, the one with the highest step, for the
    verification to say what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}")
    if (path / "state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    candidates = [p for p in path.glob("checkpoint_*") if (p / "state.json").is_file()]
    if not candidates:
        raise UserError(f"{path}: neither a checkpoint (no state.json) nor a run folder with "
                        "checkpoint_*/ folders; has training saved a checkpoint yet?")
    return max(candidates, key=lambda p: (_state(p)["step"], p.name))


def open_checkpoint(path: str | Path) -> tuple[Path, dict, RunConfig, FeatureSpec]:
    """The checkpoint at `path` (see resolve_checkpoint) once verify_checkpoint passed, with its
    state.json, config and feature spec; no tensor file is opened. A checkpoint whose tables
    use collision=zch is a UserError: eval, complete and export map ids by hashing."""
    folder = resolve_checkpoint(path)
    state = verify_checkpoint(folder, _state(folder).get("run"))
    cfg = load_config([str(folder / "config.yaml")])
    if cfg.embeddings.zch():
        raise UserError(f"{folder}: its tables use embeddings.*.collision=zch, whose id -> row map is the "
                        "managed-collision modules' sharded state; eval, complete and export read "
                        "hash tables only (collision=hash), so this checkpoint trains but does not export")
    return folder, state, cfg, load_spec(folder / SPEC_DIR)


def load_inference_model(path: str | Path) -> InferenceModel:
    """Verifies and loads the checkpoint at `path` (see resolve_checkpoint) on the CPU."""
    from embeddings.checkpoint import load_full_tables
    from embeddings.ids import IdMapper
    from embeddings.tables import pooled_dim
    from umask.backbones import build_model

    folder, state, cfg, spec = open_checkpoint(path)
    model = build_model(cfg.model, spec, sparse_dim=pooled_dim(cfg.embeddings))
    dense_file = folder / "dense.safetensors"
    try:
        weights = load_file(str(dense_file))
    except (OSError, SafetensorError) as err:
        raise UserError(f"{dense_file}: cannot read the dense weights ({err})") from None
    try:
        # a bf16 engine saved bf16 tensors; copying into the float32 model widens them exactly
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise UserError(f"{dense_file} does not fit the model its config.yaml describes: "
                        f"{str(err).splitlines()[0]} {_first_key_problem(str(err))}") from None
    model.eval().requires_grad_(False)
    tables = load_full_tables(cfg.embeddings, folder / "tables")
    return InferenceModel(folder, int(state["step"]), cfg, spec, model, tables, IdMapper(cfg.embeddings))


def _state(folder: Path) -> dict:
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{path}: expected an object with an integer 'step'")
    return state


def _first_key_problem(message: str) -> str:
    """The first line of torch's load_state_dict report that names keys or shapes."""
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    return lines[0] if lines else ""
