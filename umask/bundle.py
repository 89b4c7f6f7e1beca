"""The loader of export bundles (umask/bundle_format.py): what downstream teams install and use.

    from umask.bundle import Bundle
    bundle = Bundle("bundle/")                 # verifies every file first
    bundle.embed_users("events.parquet")       # z_u per user, with freshness columns
    bundle.complete("events.parquet", "short") # each user's latest window completed
    bundle.lookup_app([123, 456])              # table rows and vectors of raw ids

It needs torch, safetensors, numpy and pyarrow only (`pip install ./umask`), reads safetensors,
Parquet and JSON, and opens the torch.export program only after checking that it holds no
pickle. Events are contract events (docs/data-contract.md), read by the same contract
reader and turned into windows by the same code as training data (umask/contract.py,
umask/slots.py), under the bundle's feature spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from umask.bundle_format import (DENSE_DIR, MANIFEST, PROGRAM, SEEN_IDS, TABLES, read_manifest, table_schema, verify_bundle)
from umask.completion import completed_table, task_evidence
from umask.config import model_config_from_dict
from umask.errors import UserError
from umask.model import UMask
from umask.slots import ExampleRows, latest_windows
from umask.spec import SPEC_DIR, FeatureMaps, FeatureSpec, load_maps, load_spec, table_rows


@dataclass(frozen=True)
class Lookup:
    """Table rows of raw ids: rows [n] int64, vectors [n, dim] float32, and seen [n] bool
    (the id occurs in the training examples; an unseen id shares its row with the ids that
    hash to it, so its vector is theirs)."""
    rows: Tensor
    vectors: Tensor
    seen: np.ndarray


class Bundle:
    """An export bundle loaded on the CPU: the feature spec, the U-MASK model, the tables.

    Bundle(folder) verifies every file first (verify_bundle); verify=False skips the
    checksums, for a process that verified the same folder moments ago.
    """

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = verify_bundle(self.folder) if verify else read_manifest(self.folder)
        where = str(self.folder / MANIFEST)
        self.version: str = self.manifest["bundle_version"]
        self.spec: FeatureSpec = load_spec(self.folder / SPEC_DIR)
        self.maps: FeatureMaps = load_maps(self.folder / SPEC_DIR, self.spec)
        self.plausible = tuple(self.manifest["plausible_range"])
        embeddings = self.manifest["embeddings"]
        self.pooling: str = embeddings["pooling"]
        self.tables = {name: _read_table(self.folder / path, embeddings["tables"][name])
                       for name, path in TABLES.items()}
        sparse_dim = sum(table.shape[1] for table in self.tables.values())
        self.model = UMask(model_config_from_dict(self.manifest["model"], where), self.spec, sparse_dim)
        weights = {}
        for name in self.manifest["dense"]["files"]:
            try:
                weights.update(load_file(str(self.folder / name)))
            except (OSError, SafetensorError) as err:
                raise UserError(f"{self.folder / name}: cannot read the dense weights ({err})") from None
        try:
            self.model.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise UserError(f"{self.folder / DENSE_DIR}: the weights do not fit the model the manifest "
                            f"describes ({str(err).splitlines()[0]})") from None
        self.model.eval().requires_grad_(False)
        self._seen: dict[str, np.ndarray] = {}
        self._program = None

    # --- tables ----------------------------------------------------------------------------

    def lookup_app(self, raw_ids) -> Lookup:
        """The app table's rows and vectors [n, E_app] float32 of raw app ids [n] (any int64)."""
        return self._lookup("app", raw_ids)

    def lookup_location(self, raw_ids) -> Lookup:
        """The location table's rows and vectors [n, E_loc] float32 of raw loc ids [n]."""
        return self._lookup("loc", raw_ids)

    def slot_embeddings(self, rows: ExampleRows) -> Tensor:
        """Each slot's pooled app and loc embeddings [B,T,E_app+E_loc] float32 (app columns
        first): the sum or mean (manifest's pooling; 0 for an empty bag) of its ids' rows,
        as TorchRec's EmbeddingBagCollection computes them in training."""
        n, slots = rows.observed.shape
        pooled = []
        for name, values, lengths in (("app", rows.app_values, rows.app_lengths),
                                      ("loc", rows.loc_values, rows.loc_lengths)):
            table = self.tables[name]
            lengths = lengths.reshape(-1).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            indices = torch.from_numpy(table_rows(values, table.shape[0]))
            pooled.append(torch.nn.functional.embedding_bag(indices, table, torch.from_numpy(offsets),
                                                            mode=self.pooling))
        return torch.cat(pooled, dim=1).view(n, slots, -1)

    # --- users -----------------------------------------------------------------------------

    @torch.no_grad()
    def embed_rows(self, rows: ExampleRows) -> Tensor:
        """z_u [B, user_dim] float32 of decoded windows, every observed slot as evidence (the
        U-SCOPE vector the DiT is conditioned on, umask.model.UMask.user_embedding)."""
        return self.model.user_embedding(torch.from_numpy(rows.dense), torch.from_numpy(rows.observed),
                                         torch.from_numpy(rows.time_of_week.astype(np.int64)),
                                         self.slot_embeddings(rows))

    def embed_users(self, events: str | Path, batch_size: int = 512) -> pa.Table:
        """z_u of every user of a contract events dataset, folder or file, from the user's latest
        window: a table in umask.user_embeddings.EMBEDDINGS (user_id, vector [user_dim],
        bundle_version, window_start and window_end in epoch seconds, observed_slots,
        fingerprint, computed_at), by user id. Reads the file in one piece; for files of
        millions of users use umask.user_embeddings.embed_users_file (`u-mask embed-users`)."""
        from umask.user_embeddings import embed_rows_table

        return embed_rows_table(self, latest_windows(events, self.spec, self.maps, self.plausible), batch_size)

    # --- completion ------------------------------------------------------------------------

    @property
    def program(self):
        """The exported completion program (torch.export), opened on first use."""
        if self._program is None:
            self._program = torch.export.load(str(self.folder / PROGRAM)).module()
        return self._program

    @torch.no_grad()
    def complete_rows(self, rows: ExampleRows, task: str, cut: int | None = None, seed: int = 0,
                      engine: str = "program", steps: int | None = None) -> dict[str, Tensor]:
        """Completed dense [B,T,F] float32 of decoded windows for `task` (short, long, cold),
        with the cut [B], target [B,T] and evidence [B,T] used (umask/completion.py).

        engine "program" runs program/complete.pt2, "eager" the model rebuilt from the
        safetensors weights; both draw the evidence, then the DDIM start noise, from one
        generator seeded with `seed`, as `u-mask complete` does. steps: DDIM steps, eager
        only (the program has the model's sample_steps built in).
        """
        dense = torch.from_numpy(rows.dense)
        observed = torch.from_numpy(rows.observed)
        time_of_week = torch.from_numpy(rows.time_of_week.astype(np.int64))
        generator = torch.Generator().manual_seed(seed)
        masks = task_evidence(dense, observed, time_of_week, task, cut, self.spec, self.model.cfg.mask, generator)
        noise = torch.randn(dense.shape, generator=generator)
        sparse = self.slot_embeddings(rows)
        if engine == "program":
            if steps not in (None, self.manifest["program"]["sample_steps"]):
                raise UserError(f"steps {steps}: the program runs {self.manifest['program']['sample_steps']} "
                                "DDIM steps; use engine='eager' for another number")
            completed = self.program(dense, masks["evidence"], time_of_week, sparse, noise)
        elif engine == "eager":
            timesteps = self.model.diffusion.ddim_timesteps(steps or self.model.cfg.diffusion.sample_steps)
            completed = self.model.complete_from_noise(dense, masks["evidence"], time_of_week, sparse, noise,
                                                       timesteps)
        else:
            raise UserError(f"engine {engine!r}: must be 'program' or 'eager'")
        return {"dense": completed, **masks}

    def complete(self, events: str | Path, task: str, cut: int | None = None, seed: int = 0,
                 engine: str = "program") -> pa.Table:
        """Each user's latest window of a contract events dataset, folder or file, completed
        for `task`: one umask.completion.COMPLETED row per (user, slot) with the completed
        dense channels [F] (the spec's DenseLayout: log1p counts, region shares, log1p bytes),
        and which slots were observed, shown as evidence and targeted."""
        rows = latest_windows(events, self.spec, self.maps, self.plausible)
        result = self.complete_rows(rows, task, cut, seed, engine)
        return completed_table(rows, result["dense"], result["evidence"], result["target"], self.spec)

    def _lookup(self, name: str, raw_ids) -> Lookup:
        ids = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
        table = self.tables[name]
        rows = table_rows(ids, table.shape[0])
        if name not in self._seen:
            self._seen[name] = pq.read_table(self.folder / SEEN_IDS[name], columns=["raw_id"]).column(
                "raw_id").to_numpy()
        seen_ids = self._seen[name]
        position = np.minimum(np.searchsorted(seen_ids, ids), max(len(seen_ids) - 1, 0))
        seen = seen_ids[position] == ids if len(seen_ids) else np.zeros(len(ids), bool)
        rows_t = torch.from_numpy(rows)
        return Lookup(rows_t, table[rows_t], seen)


def _read_table(path: Path, expected: dict) -> Tensor:
    """tables/<name>.parquet as a [rows, dim] float32 tensor, after checking its rows are
    0..rows-1 in order and its width is the manifest's."""
    table = pq.read_table(path)
    if table.schema != table_schema(expected["dim"]) or table.num_rows != expected["rows"]:
        raise UserError(f"{path}: expected {expected['rows']} rows of (row, vector[{expected['dim']}]), "
                        f"got {table.num_rows} rows of {table.schema}")
    rows = table.column("row").to_numpy()
    if not np.array_equal(rows, np.arange(expected["rows"])):
        raise UserError(f"{path}: rows are not 0..{expected['rows'] - 1} in order")
    vectors = table.column("vector").combine_chunks().flatten().to_numpy()
    return torch.from_numpy(vectors.reshape(expected["rows"], expected["dim"]).copy())
