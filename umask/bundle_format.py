"""The export bundle's format: the contract between `u-mask export` and downstream teams.

A bundle is a folder that holds tensors in safetensors and Parquet, settings in JSON, and a
torch.export program, and never a pickle. Paths are relative to the folder:

  manifest.json              `format` (semver), `created_at` (UTC ISO time, the only field that
                             differs between two exports of one checkpoint), `run`, `step`,
                             `bundle_version`, `data_contract`, `model` (umask.config.ModelConfig
                             as a dict), `embeddings` (pooling; rows and dim per table), `feature_spec`
                             (spec.json's content: slots, slot seconds, C, K, the dense layout,
                             region centroids, the id hashing rule), `plausible_range`, `dense`
                             (its files), `program` (inputs, DDIM steps), `eval` (headline metrics
                             of an eval report, or null), `users` (whether users.parquet is there)
                             and `files`: {path: {"sha256", "bytes"}} of every other file
  spec/                      the feature spec folder of the training features (umask/spec.py)
  dense/model-0000i-of-0000n.safetensors   the dense U-MASK weights, float32, split by size
  tables/app.parquet, tables/loc.parquet   (row int64, vector fixed_size_list<float32>[dim]):
                             every table row, ascending; row r serves the raw ids with
                             umask.spec.table_rows(id, rows) == r
  ids/app.parquet, ids/loc.parquet         (raw_id int64, row int64): the raw ids seen in the
                             training examples, ascending, with their table row
  program/complete.pt2       torch.export of UMask.complete_from_noise with the model's DDIM
                             steps, the batch dimension dynamic; inputs PROGRAM_INPUTS
  users.parquet              optional: the training users' vectors (umask.user_embeddings)

`bundle_version` is the sha256 of the canonical JSON of `files` and so names the content:
two exports of one checkpoint share it. The loader (`Bundle`) refuses a bundle whose major
format is not its own, and a file that is missing, truncated or altered, in one line naming
the file; it reads safetensors, Parquet and JSON only, and opens the program only after
checking that no entry of the archive is a pickle.

This module imports no torch (the export's table writer uses it too); the loader is
umask/bundle.py.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pyarrow as pa

from umask.errors import UserError
from umask.spec import SPEC_DIR, file_sha256

FORMAT = "1.0.0"
MANIFEST = "manifest.json"
DENSE_DIR = "dense"
TABLES = {"app": "tables/app.parquet", "loc": "tables/loc.parquet"}  # in the pooled output's order
SEEN_IDS = {"app": "ids/app.parquet", "loc": "ids/loc.parquet"}
PROGRAM = "program/complete.pt2"
USERS = "users.parquet"
# the program's positional inputs: dense [B,T,F] float32, evidence [B,T] bool, time_of_week
# [B,T] int64, slot_sparse [B,T,E] float32 (pooled app then loc rows), noise [B,T,F] float32
# (the DDIM start x_T); output: the completed dense [B,T,F] float32
PROGRAM_INPUTS = ("dense", "evidence", "time_of_week", "slot_sparse", "noise")
SEEN_SCHEMA = pa.schema([pa.field("raw_id", pa.int64(), nullable=False),
                         pa.field("row", pa.int64(), nullable=False)])


def table_schema(dim: int) -> pa.Schema:
    """Schema of tables/<name>.parquet for a table of `dim` columns."""
    return pa.schema([pa.field("row", pa.int64(), nullable=False),
                      pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)])


def bundle_version(files: dict) -> str:
    """sha256 of the canonical JSON of the manifest's `files` (path -> sha256 and bytes)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_entry(path: Path) -> dict:
    """{"sha256", "bytes"} of a file, as the manifest lists it."""
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def pickled_entries(archive: Path) -> list[str]:
    """Names of the entries of a torch.export .pt2 archive that are pickles: tensors the
    weights or constants configs mark use_pickle, and non-empty example inputs."""
    found = []
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                entries = json.loads(zf.read(name)).get("config", {})
                found += [f"{name}:{key}" for key, meta in entries.items() if meta.get("use_pickle")]
            elif "/sample_inputs/" in name and zf.getinfo(name).file_size:
                found.append(name)
    return found


def read_manifest(folder: str | Path) -> dict:
    """manifest.json of a bundle once its format's major version is this loader's."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {folder} is not an export bundle (`u-mask export` writes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: not a bundle manifest (no 'files' mapping)")
    version = str(manifest.get("format", ""))
    ours = int(FORMAT.split(".")[0])
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise UserError(f"{path}: format {version or 'missing'} is not a semantic version") from None
    if major > ours:
        raise UserError(f"{path}: bundle format {version} is newer than this loader reads "
                        f"({ours}.x); install the loader of the umask-trainer that exported it")
    if major < ours:
        raise UserError(f"{path}: bundle format {version} is older than this loader reads "
                        f"({ours}.x); export the checkpoint again")
    return manifest


def verify_bundle(folder: str | Path) -> dict:
    """The manifest, once every file it lists is present, of its size and its sha256.

    Errors (UserError, one line naming the file): missing, truncated or grown (the size
    differs), altered (the checksum differs), and a program archive that holds a pickle.
    Cost: one read of every byte (about 1 s per GB on one core).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest["files"]
    required = [*TABLES.values(), *SEEN_IDS.values(), PROGRAM, f"{SPEC_DIR}/spec.json",
                *manifest.get("dense", {}).get("files", [])]
    unlisted = [name for name in required if name not in files]
    if unlisted or not manifest.get("dense", {}).get("files"):
        raise UserError(f"{folder / MANIFEST}: does not list {unlisted[0] if unlisted else 'dense weights'}, "
                        "which every bundle holds; the manifest was edited or the export was interrupted")
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path}: missing from the bundle (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            kind = "truncated" if size < entry["bytes"] else "longer than exported"
            raise UserError(f"{path}: {kind} ({size} bytes, {MANIFEST} says {entry['bytes']})")
        if file_entry(path)["sha256"] != entry["sha256"]:
            raise UserError(f"{path}: checksum does not match {MANIFEST}; the file was altered")
    pickles = pickled_entries(folder / PROGRAM)
    if pickles:
        raise UserError(f"{folder / PROGRAM}: holds a pickle ({pickles[0]}); refusing to load it")
    return manifest
