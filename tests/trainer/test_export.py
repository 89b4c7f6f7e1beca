"""`u-mask export` and the bundle loader, on a real 2-worker training run (ZeRO-3, the loc table
column-wise over both ranks), and the loader in a fresh virtualenv without this project.

Tolerances: the loader pools each slot's table rows with torch's embedding_bag where training
uses TorchRec's (FBGEMM) kernel, and float sums in another order may differ in the last bits;
through the model that is at most a few 1e-6 on values of order 1, so outputs are compared
with atol = rtol = 1e-5. Measured on this run they are equal bit for bit.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.data.batch import Batch
from trainer.inference.complete import complete_windows
from trainer.inference.export import export_bundle
from trainer.inference.loading import load_inference_model
from trainer.training.launch import train
from umask.bundle import Bundle
from umask.bundle_format import MANIFEST, PROGRAM, TABLES, USERS
from umask.errors import UserError
from umask.slots import latest_windows
from umask.user_embeddings import embed_users_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset, embedded_ray):
    """A run of 6 steps on 2 Ray workers under ZeRO-3, with a column-wise loc table."""
    runs = tmp_path_factory.mktemp("export-runs")
    cfg = load_config([str(ROOT / "configs" / "tiny.yaml")], [
        f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
        f"ray.storage_path={runs}", "ray.name=exported", "train.steps=6", "train.checkpoint_every=6",
        "train.log_every=3", "deepspeed.zero_stage=3", "embeddings.loc.sharding_types=[column_wise]",
        "embeddings.loc.column_shard_dim=8"])
    assert train(cfg).error is None
    return runs / "exported"


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    from trainer.inference.evaluate import EvalSettings, evaluate_checkpoint

    out = tmp_path_factory.mktemp("eval")
    evaluate_checkpoint(trained, out, EvalSettings(split="test", batches=1, batch_size=8, popularity_batches=1))
    return out / "report.json"


@pytest.fixture(scope="module")
def bundle(trained, report, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(trained, out, eval_report=report, users=True, max_shard_bytes=64 << 10)
    return out


@pytest.fixture(scope="module")
def events(tiny_dataset, tmp_path_factory):
    """The contract events of 12 users (train and held-out alike), no side tables beside them."""
    table = pq.read_table(tiny_dataset / "raw" / "events")
    users = pc.unique(table["user_id"]).sort()[:12]
    path = tmp_path_factory.mktemp("events") / "events.parquet"
    pq.write_table(table.filter(pc.is_in(table["user_id"], value_set=users)), path)
    return path


def test_the_manifest_names_the_model_the_data_and_every_file(bundle, trained, report):
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["format"] == "1.0.0" and manifest["run"] == "exported" and manifest["step"] == 6
    assert manifest["model"]["hidden"] == 64 and manifest["model"]["diffusion"]["sample_steps"] == 1
    assert manifest["embeddings"] == {"pooling": "sum", "tables": {"app": {"rows": 4096, "dim": 16},
                                                                   "loc": {"rows": 4096, "dim": 16}}}
    spec = manifest["feature_spec"]
    assert (spec["slots"], spec["slot_seconds"], spec["num_categories"], spec["num_regions"]) == (168, 3600, 20, 32)
    assert spec["dense_layout"]["channels"] == 56 and "splitmix64" in spec["id_hash"]
    assert len(spec["region_centroids"]) == 32
    assert len(manifest["dense"]["files"]) > 1  # 64 KiB files
    assert manifest["eval"]["split"] == "test" and set(manifest["eval"]["tasks"]) == {"short", "long", "cold"}
    assert "category_mrr" in manifest["eval"]["tasks"]["short"]
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert all(entry["bytes"] == (bundle / name).stat().st_size for name, entry in manifest["files"].items())
    assert manifest["users"]["split"] == "train"
    # a bundle is shared with other teams: every file readable by them (safetensors writes 0600)
    assert all((bundle / name).stat().st_mode & 0o044 == 0o044 for name in [*manifest["files"], MANIFEST])


def test_no_file_of_the_bundle_is_a_pickle(bundle):
    import zipfile

    from safetensors import safe_open

    from umask.bundle_format import pickled_entries

    for path in bundle.rglob("*"):
        if path.suffix == ".parquet":
            pq.ParquetFile(path)
        elif path.suffix == ".safetensors":
            safe_open(str(path), framework="np")
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.is_dir() or path.suffix == ".pt2", path
    assert pickled_entries(bundle / PROGRAM) == []
    with zipfile.ZipFile(bundle / PROGRAM) as archive:
        assert [i.file_size for i in archive.infolist() if "sample_inputs" in i.filename] == [0]


def test_export_is_deterministic(bundle, trained, report, tmp_path):
    again = tmp_path / "again"
    export_bundle(trained, again, eval_report=report, users=True, max_shard_bytes=64 << 10)
    first, second = (json.loads((b / MANIFEST).read_text()) for b in (bundle, again))
    for manifest in (first, second):
        del manifest["created_at"], manifest["users"]["computed_at"], manifest["files"][USERS]
    assert first == second
    for name in first["files"]:
        assert (bundle / name).read_bytes() == (again / name).read_bytes(), name
    users = [pq.read_table(b / USERS).drop_columns(["computed_at"]) for b in (bundle, again)]
    assert users[0].equals(users[1])


def test_the_loader_computes_what_the_training_model_computes(bundle, trained, events):
    loaded = Bundle(bundle)
    inference = load_inference_model(trained)
    rows = latest_windows(events, inference.spec, inference.maps)
    batch = Batch.of_rows(rows)
    torch.testing.assert_close(loaded.slot_embeddings(rows), inference.slot_sparse(batch), **TOLERANCE)
    for task in ("short", "long", "cold"):
        trained_model = complete_windows(inference, rows, task, None, None, seed=3)
        for engine in ("program", "eager"):
            result = loaded.complete_rows(rows, task, seed=3, engine=engine)
            assert torch.equal(result["evidence"], trained_model["evidence"])
            torch.testing.assert_close(result["dense"], trained_model["dense"], **TOLERANCE)
    z = inference.model.user_embedding(batch.dense, batch.observed, batch.time_of_week, inference.slot_sparse(batch))
    embedded = loaded.embed_users(events)
    assert embedded["user_id"].to_pylist() == rows.user_id.tolist()
    vectors = torch.from_numpy(np.stack(embedded["vector"].to_numpy(zero_copy_only=False)))
    torch.testing.assert_close(vectors, z, **TOLERANCE)
    assert embedded["window_end"].to_pylist() == (rows.window_start + 168 * 3600).tolist()
    assert embedded["observed_slots"].to_pylist() == rows.observed.sum(1).tolist()
    completed = loaded.complete(events, "short")
    assert completed.num_rows == 12 * 168
    # the dense column is labelled from the bundle's spec, as `u-mask complete` labels it
    assert json.loads(completed.schema.metadata[b"umask.dense_channels"]) == loaded.spec.layout.channel_names()


def test_lookups_give_the_trained_rows_and_say_which_ids_training_saw(bundle, trained, tiny_dataset):
    loaded = Bundle(bundle)
    inference = load_inference_model(trained)
    train_ids = pc.unique(pq.read_table(tiny_dataset / "features" / "split=train", columns=["app_ids"])
                          ["app_ids"].combine_chunks().flatten()).to_numpy()
    unseen = np.array([-5, 2**62 + 1])
    lookup = loaded.lookup_app(np.concatenate([train_ids[:5], unseen]))
    assert lookup.seen.tolist() == [True] * 5 + [False] * 2
    from umask.spec import table_rows

    assert lookup.rows.tolist() == table_rows(np.concatenate([train_ids[:5], unseen]), 4096).tolist()
    assert torch.equal(lookup.vectors, inference.tables.embedding_bags["app"].weight[lookup.rows])
    loc = loaded.lookup_location([7, 8])
    assert torch.equal(loc.vectors, inference.tables.embedding_bags["loc"].weight[loc.rows])
    assert loc.vectors.shape == (2, 16)


def flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def corrupt(bundle: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    change(copy)
    return copy


@pytest.mark.parametrize("change, message", [
    (lambda b: (b / TABLES["loc"]).write_bytes((b / TABLES["loc"]).read_bytes()[:-100]),
     r"tables/loc.parquet: truncated \(\d+ bytes, manifest.json says \d+\)"),
    (lambda b: flip_last_byte(sorted((b / "dense").glob("*.safetensors"))[0]),
     r"dense/model-00001-of-\d+.safetensors: checksum does not match manifest.json; the file was altered"),
    (lambda b: (b / PROGRAM).unlink(), r"program/complete.pt2: missing from the bundle"),
    (lambda b: (b / "spec" / "app_categories.parquet").unlink(), r"spec/app_categories.parquet: missing"),
    (lambda b: (b / MANIFEST).write_text((b / MANIFEST).read_text().replace('"format": "1.0.0"', '"format": "2.1.0"')),
     r"bundle format 2.1.0 is newer than this loader reads \(1.x\)"),
    (lambda b: (b / MANIFEST).unlink(), r"manifest.json: missing; .* is not an export bundle"),
])
def test_a_damaged_bundle_is_refused_naming_the_file(bundle, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        Bundle(corrupt(bundle, tmp_path, change))


def test_a_program_holding_a_pickle_is_refused(bundle, tmp_path):
    import zipfile

    def add_pickle(b: Path):
        source = b / PROGRAM
        with zipfile.ZipFile(source) as old, zipfile.ZipFile(b / "p.pt2", "w") as new:
            for item in old.infolist():
                data = old.read(item)
                if "sample_inputs" in item.filename:
                    data = b"\x80\x02}q\x00."
                new.writestr(item, data)
        (b / "p.pt2").replace(source)
        manifest = json.loads((b / MANIFEST).read_text())
        from umask.bundle_format import file_entry

        manifest["files"][PROGRAM] = file_entry(source)
        (b / MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(UserError, match=r"complete.pt2: holds a pickle \(.*sample_inputs"):
        Bundle(corrupt(bundle, tmp_path, add_pickle))


def test_embed_users_refreshes_only_the_users_whose_window_changed(bundle, events, tmp_path):
    out = tmp_path / "users.parquet"
    first = embed_users_file(bundle, events, out, processes=2)
    assert (first["users"], first["recomputed"], first["kept"]) == (12, 12, 0)
    before = pq.read_table(out).sort_by("user_id")
    table = pq.read_table(events)
    users = before["user_id"].to_pylist()
    changed, gone = users[0], users[1]
    # one more event for `changed` in its latest window; no events at all for `gone`
    last = table.filter(pc.equal(table["user_id"], changed)).sort_by([("ts", "descending")]).slice(0, 1)
    last = last.set_column(last.schema.get_field_index("app_id"), "app_id", pa.array([999_999], pa.int64()))
    newer = pa.concat_tables([table.filter(pc.not_equal(table["user_id"], gone)), last.cast(table.schema)])
    new_events = tmp_path / "new.parquet"
    pq.write_table(newer, new_events)
    second = embed_users_file(bundle, new_events, out)
    assert (second["users"], second["recomputed"], second["kept"]) == (12, 1, 11)
    after = pq.read_table(out).sort_by("user_id")
    assert after["user_id"].to_pylist() == users
    for row_before, row_after in zip(before.to_pylist(), after.to_pylist()):
        if row_before["user_id"] == changed:
            assert row_after["fingerprint"] != row_before["fingerprint"]
            assert row_after["vector"] != row_before["vector"]
        else:
            assert row_after == row_before  # kept as it was, computed_at included


def test_export_users_are_fresh_for_the_events_they_came_from(bundle, tiny_dataset, tmp_path):
    """users.parquet (from the training features) and embed-users (from the raw events) compute
    the same windows: refreshing it with the training users' events recomputes nobody."""
    exported = pq.read_table(bundle / USERS)
    table = pq.read_table(tiny_dataset / "raw" / "events")
    events = tmp_path / "train-users.parquet"
    pq.write_table(table.filter(pc.is_in(table["user_id"], value_set=exported["user_id"])), events)
    out = tmp_path / "users.parquet"
    shutil.copy(bundle / USERS, out)
    done = embed_users_file(bundle, events, out)
    assert (done["recomputed"], done["kept"]) == (0, exported.num_rows)


def test_the_commands_export_and_embed(trained, events, tmp_path, capsys):
    out = tmp_path / "cli-bundle"
    assert cli_main(["export", "--checkpoint", str(trained), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote bundle {out}: run exported step 6" in printed and "u-mask embed-users" in printed
    assert cli_main(["embed-users", "--bundle", str(out), "--events", str(events),
                     "--out", str(tmp_path / "u.parquet")]) == 0
    assert "12 users, 12 computed and 0 kept" in capsys.readouterr().out
    assert cli_main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "x"),
                     "--features", str(tmp_path)]) == 2
    assert "no training features here" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert cli_main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "busy")]) == 2
    assert "holds notes.txt, which is not part of an export bundle" in capsys.readouterr().err


def test_an_eval_report_of_another_step_is_refused(trained, report, tmp_path):
    other = json.loads(report.read_text())
    other["step"] = 5
    (tmp_path / "report.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="evaluates step 5, but the exported checkpoint is step 6"):
        export_bundle(trained, tmp_path / "b", eval_report=tmp_path / "report.json")


@pytest.fixture(scope="session")
def loader_venv(tmp_path_factory) -> Path:
    """A virtualenv with torch, safetensors, numpy and pyarrow from the package index, then only
    the loader (a copy of umask/, installed with --no-deps): this project is not in it. About
    30 s to build; built once per session."""
    venv = tmp_path_factory.mktemp("loader-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0", "safetensors", "numpy", "pyarrow"], check=True, timeout=900,
                   capture_output=True)
    source = tmp_path_factory.mktemp("loader-src") / "umask"
    shutil.copytree(ROOT / "umask", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run([*pip, "--no-deps", str(source)], check=True, timeout=600, capture_output=True)
    return venv


def test_the_loader_alone_in_a_fresh_virtualenv_matches_the_training_model(loader_venv, bundle, trained, events,
                                                                         tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch
        from umask.bundle import Bundle
        from umask.slots import latest_windows
        bundle = Bundle({str(bundle)!r})
        rows = latest_windows({str(events)!r}, bundle.spec, bundle.maps)
        out = {{"modules": sorted(m for m in ("trainer", "embeddings", "ray", "deepspeed", "torchrec", "omegaconf")
                                 if m in sys.modules)}}
        for engine in ("program", "eager"):
            out[engine] = bundle.complete_rows(rows, "long", seed=5, engine=engine)["dense"].numpy().tolist()
        out["z"] = bundle.embed_rows(rows).numpy().tolist()
        out["app"] = bundle.lookup_app([11, 12]).vectors.numpy().tolist()
        print(json.dumps(out))
    """)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(loader_venv / "bin" / "python"), "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["modules"] == []
    inference = load_inference_model(trained)
    rows = latest_windows(events, inference.spec, inference.maps)
    batch = Batch.of_rows(rows)
    expected = complete_windows(inference, rows, "long", None, None, seed=5)["dense"]
    for engine in ("program", "eager"):
        torch.testing.assert_close(torch.tensor(got[engine]), expected, **TOLERANCE)
    z = inference.model.user_embedding(batch.dense, batch.observed, batch.time_of_week, inference.slot_sparse(batch))
    torch.testing.assert_close(torch.tensor(got["z"]), z, **TOLERANCE)
    from umask.spec import table_rows

    rows_app = torch.from_numpy(table_rows(np.array([11, 12]), 4096))
    assert torch.equal(torch.tensor(got["app"]), inference.tables.embedding_bags["app"].weight[rows_app])
    # the loader's command, for files of millions of users
    command = [str(loader_venv / "bin" / "python"), "-m", "umask", "embed-users", "--bundle", str(bundle),
               "--events", str(events), "--out", str(tmp_path / "users.parquet"), "--processes", "2"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12 users, 12 computed and 0 kept" in done.stdout
    vectors = np.stack(pq.read_table(tmp_path / "users.parquet").sort_by("user_id")["vector"].to_numpy(
        zero_copy_only=False))
    torch.testing.assert_close(torch.from_numpy(vectors), z, **TOLERANCE)
