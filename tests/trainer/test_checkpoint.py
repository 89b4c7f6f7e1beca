"""Checkpoint verification: only files this run wrote, unmodified, are ever loaded."""
import json

import pytest

from trainer.checkpoint import verify_checkpoint, write_manifest, write_state
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
