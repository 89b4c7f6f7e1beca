"""Checkpoint verification: only files this run wrote, unmodified, are ever loaded."""
import json
import shutil

import pytest

from trainer.training.checkpoint import (is_complete, latest_checkpoint, verify_checkpoint, write_manifest,
                                         write_state)
from umask.errors import UserError


@pytest.fixture
def two_rank_checkpoint(tmp_path):
    """A merged checkpoint folder as Ray leaves it: each rank's files and manifest side by side."""
    merged = tmp_path / "checkpoint"
    for rank in (0, 1):
        own = tmp_path / f"rank{rank}"
        (own / "engine").mkdir(parents=True)
        (own / "engine" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank]) * 64)
        (own / f"loader-rank{rank}.json").write_text(json.dumps({"epoch": 0, "batches_in_epoch": 3}))
        if rank == 0:
            write_state(own, step=12, world_size=2, run_name="r")
            (own / "config.yaml").write_text("train: {steps: 12}\n")
            (own / "dense.safetensors").write_bytes(b"\x01" * 32)
            (own / "spec").mkdir()
            (own / "spec" / "spec.json").write_text("{}")
        write_manifest(own, rank=rank, run_name="r")
        for path in own.rglob("*"):
            if path.is_file():
                target = merged / path.relative_to(own)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return merged


def test_an_intact_checkpoint_verifies(two_rank_checkpoint):
    assert verify_checkpoint(two_rank_checkpoint, "r") == {"step": 12, "world_size": 2, "run": "r"}


def test_a_modified_file_is_refused(two_rank_checkpoint):
    (two_rank_checkpoint / "engine" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="zero_pp_rank_1_optim_states.pt: checksum does not match manifest-rank1"):
        verify_checkpoint(two_rank_checkpoint, "r")


def test_a_missing_file_is_refused(two_rank_checkpoint):
    (two_rank_checkpoint / "loader-rank1.json").unlink()
    with pytest.raises(UserError, match="loader-rank1.json is listed in manifest-rank1.json but missing"):
        verify_checkpoint(two_rank_checkpoint, "r")


def test_another_runs_checkpoint_is_refused(two_rank_checkpoint):
    with pytest.raises(UserError, match="written by run 'r', not 'other'"):
        verify_checkpoint(two_rank_checkpoint, "other")


def test_a_folder_without_manifests_is_refused(tmp_path):
    with pytest.raises(UserError, match="no manifest-rank"):
        verify_checkpoint(tmp_path, "r")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_missing_ranks_manifest_is_refused(two_rank_checkpoint, rank):
    (two_rank_checkpoint / f"manifest-rank{rank}.json").unlink()
    with pytest.raises(UserError, match=f"{two_rank_checkpoint}: .*manifest-rank{rank}.json.* missing") as err:
        verify_checkpoint(two_rank_checkpoint, "r")
    assert "\n" not in str(err.value)


def test_the_missing_rank_is_named(two_rank_checkpoint):
    (two_rank_checkpoint / "manifest-rank1.json").unlink()
    with pytest.raises(UserError, match=r"world_size=2, but manifest-rank1.json \(rank 1\) is missing"):
        verify_checkpoint(two_rank_checkpoint, "r")


@pytest.mark.parametrize("name", ["state.json", "config.yaml", "dense.safetensors", "spec/spec.json"])
def test_a_missing_rank0_file_is_refused(two_rank_checkpoint, name):
    (two_rank_checkpoint / name).unlink()
    with pytest.raises(UserError, match=f"{name} is listed in manifest-rank0.json but missing"):
        verify_checkpoint(two_rank_checkpoint, "r")


@pytest.mark.parametrize("name", ["state.json", "config.yaml", "dense.safetensors", "spec/spec.json"])
def test_a_rank0_file_left_out_of_the_manifest_is_refused(two_rank_checkpoint, name):
    path = two_rank_checkpoint / "manifest-rank0.json"
    manifest = json.loads(path.read_text())
    del manifest["files"][name]
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"manifest-rank0.json does not list {name}"):
        verify_checkpoint(two_rank_checkpoint, "r")


def test_a_manifest_of_another_rank_is_refused(two_rank_checkpoint):
    path = two_rank_checkpoint / "manifest-rank1.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rank": 0}))
    with pytest.raises(UserError, match="manifest-rank1.json: says rank 0, but its name says rank 1"):
        verify_checkpoint(two_rank_checkpoint, "r")


def test_a_rank_beyond_the_world_size_is_refused(two_rank_checkpoint, tmp_path):
    stray = tmp_path / "rank2"
    stray.mkdir()
    write_manifest(stray, rank=2, run_name="r")
    (two_rank_checkpoint / "manifest-rank2.json").write_bytes((stray / "manifest-rank2.json").read_bytes())
    with pytest.raises(UserError, match="manifest-rank2.json is from rank 2, but state.json says world_size=2"):
        verify_checkpoint(two_rank_checkpoint, "r")


def test_a_rank_hashes_only_the_files_of_the_ranks_it_is_given(two_rank_checkpoint):
    (two_rank_checkpoint / "engine" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"\x00" * 64)
    assert verify_checkpoint(two_rank_checkpoint, "r", ranks=[0])["step"] == 12  # rank 1's file unread
    with pytest.raises(UserError, match="checksum does not match manifest-rank1"):
        verify_checkpoint(two_rank_checkpoint, "r", ranks=[1])
    # the structure is checked whichever ranks hash: a missing manifest is refused by every rank
    (two_rank_checkpoint / "manifest-rank1.json").unlink()
    with pytest.raises(UserError, match="manifest-rank1.json .* missing"):
        verify_checkpoint(two_rank_checkpoint, "r", ranks=[0])


def _partial_copy(complete, folder, step: int, drop):
    """A copy of `complete` as a crash while writing it would leave it: newer step, `drop` missing."""
    shutil.copytree(complete, folder)
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "step": step}))
    for name in drop:
        (folder / name).unlink()


def test_the_latest_checkpoint_is_the_newest_complete_one(two_rank_checkpoint, tmp_path):
    from trainer.inference.loading import resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(two_rank_checkpoint, run / "checkpoint_a")  # step 12, whole
    _partial_copy(two_rank_checkpoint, run / "checkpoint_b", 24, ["manifest-rank1.json"])  # a rank died
    _partial_copy(two_rank_checkpoint, run / "checkpoint_c", 36, ["loader-rank1.json"])  # died copying
    assert is_complete(run / "checkpoint_a")
    assert not is_complete(run / "checkpoint_b") and not is_complete(run / "checkpoint_c")
    assert latest_checkpoint(run) == run / "checkpoint_a"
    assert resolve_checkpoint(run) == run / "checkpoint_a"  # eval, complete and export take it too
    assert latest_checkpoint(tmp_path / "nothing") is None
