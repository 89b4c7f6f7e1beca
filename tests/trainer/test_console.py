"""What the commands show while they work: bars on a terminal, plain lines elsewhere; and the
pieces that feed them (metrics.csv followed while it grows, the run listing, the loss curve)."""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from trainer.console import Progress, TrainingDisplay
from trainer.training.progress import ProgressLog, follow_csv, step_line
from trainer.training.runs import latest_checkpoint, list_runs, plot_losses

BIN = Path(sys.executable).parent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ROW = {"step": "10", "loss": "0.25", "reconstruction": "0.03", "consistency": "2.0", "grad_norm": "0.3",
       "data_wait": "0.01", "lr": "0.001", "examples_per_s": "120.5", "elapsed_s": "4.0", "eta_s": "12.0",
       "out_of_contract_app": "0", "out_of_contract_loc": "0"}


def test_training_shows_plain_lines_off_a_terminal_and_a_bar_on_one():
    lines = io.StringIO()
    display = TrainingDisplay(40, stream=lines)
    display.row(ROW)
    display.close()
    assert lines.getvalue() == ("step 10/40 loss=0.2500 reconstruction=0.0300 consistency=2.0000 "
                                "grad_norm=0.3000 data_wait=0.0100 examples/s=120.5 eta=12s\n")

    terminal = Terminal()
    display = TrainingDisplay(40, start_step=0, stream=terminal)
    display.row(ROW)
    display.row({**ROW, "step": "20", "loss": "0.125"})
    display.close()
    screen = terminal.getvalue()
    assert "\r" in screen and "20/40" in screen and "loss=0.1250" in screen
    assert "step 10/40" not in screen  # a bar, not the lines


def test_the_plan_comes_before_the_first_step_and_the_run_ends_with_memory_and_ids(tmp_path):
    from trainer.cli import run_report

    plan = tmp_path / "plan.txt"
    plan.write_text("embedding plan: each cpu rank offers ...\n  app (4,096 x 16): table_wise\n")
    lines = io.StringIO()
    display = TrainingDisplay(40, stream=lines, plan=plan)
    display.row(ROW)
    display.row({**ROW, "step": "20"})
    shown = lines.getvalue().splitlines()
    assert shown[:2] == ["embedding plan: each cpu rank offers ...", "  app (4,096 x 16): table_wise"]
    assert [line.split()[1] for line in shown[2:]] == ["10/40", "20/40"]  # the plan once, first

    report = run_report({**ROW, "peak_rss_gb_rank0": "3.431526", "peak_rss_gb_rank1": "3.385258",
                         "out_of_contract_app": "2", "out_of_contract_loc": "0"})
    assert report[0].startswith("peak resident memory: rank 0 3.43, rank 1 3.39 GiB; driver ")
    assert report[1] == ("off-contract ids: app 2, loc 0 negative ids were hashed like any id (not dropped, "
                         "not clipped); see out_of_contract_* in metrics.csv")
    assert len(run_report(ROW)) == 1  # no off-contract id: no line for them


def test_off_contract_ids_are_reported_once():
    lines = io.StringIO()
    display = TrainingDisplay(40, stream=lines)
    display.row({**ROW, "out_of_contract_app": "3"})
    display.row({**ROW, "step": "20", "out_of_contract_app": "5"})
    warnings = [line for line in lines.getvalue().splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 3 negative (off-contract) ids so far (app 3, loc 0); they are hashed "
                        "like any id and counted in metrics.csv"]


def test_progress_prints_nothing_for_quick_work_and_a_line_now_and_then_for_long_work():
    quick = io.StringIO()
    with Progress("featurize", "buckets", stream=quick) as progress:
        for done in range(1, 9):
            progress.update(done, 8)
    assert quick.getvalue() == ""

    slow = io.StringIO()
    with Progress("eval", "batches", stream=slow, every_s=0.05) as progress:
        progress.update(1, 4)
        time.sleep(0.06)
        progress.update(2, 4)
        progress.update(3, 4)  # within every_s of the last line
        time.sleep(0.06)
        progress.update(4, 4)  # the end: the command's own closing line follows
    assert slow.getvalue().splitlines() == [
        line for line in slow.getvalue().splitlines() if line.startswith("eval: 2/4 batches (50%)")]
    assert len(slow.getvalue().splitlines()) == 1


def test_synth_draws_a_bar_on_a_terminal(tmp_path):
    """The real command under a pseudo-terminal (80 columns), read back as a terminal gets it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen([str(BIN / "u-mask"), "data", "synth", "--out", str(tmp_path / "raw"),
                                "--users", "12", "--days", "7"],
                               stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the follower side closed: the program ended
                break
            if not chunk:
                break
            screen += chunk
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    text = screen.decode()
    assert "\rsynth:   0%|" in text and "/12 [" in text and " users/s]" in text  # tqdm's bar, then cleared
    assert text.rstrip().splitlines()[-1].startswith("synth: 12 users")


def test_follow_csv_sees_the_rows_appended_while_it_runs(tmp_path):
    log = ProgressLog(tmp_path, total_steps=4, log_every=2, is_rank0=True)
    log.step(1, 8, None)
    log.step(2, 8, {"loss": 1.0})  # before following: an earlier run's row, skipped
    seen = []
    with follow_csv(tmp_path / "metrics.csv", seen.append, poll_s=0.01):
        log.step(3, 8, None)
        log.step(4, 8, {"loss": 0.5})
        time.sleep(0.05)
    assert [(row["step"], row["loss"]) for row in seen] == [("4", "0.5")]
    assert float(seen[0]["eta_s"]) == 0.0
    assert step_line(seen[0], 4).startswith("step 4/4 loss=0.5000")


def test_a_resumed_run_appends_under_the_columns_the_file_started_with(tmp_path):
    ProgressLog(tmp_path, 4, 1, True).step(1, 8, {"loss": 1.0})
    ProgressLog(tmp_path, 4, 1, True, start_step=1).step(2, 8, {"loss": 0.5, "grad_norm": 0.1})
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["loss"] for r in rows] == ["1.0", "0.5"] and "grad_norm" not in rows[0]


def _run(storage: Path, name: str, steps: int, logged: list[tuple[int, float]], checkpoints: list[int]) -> Path:
    run = storage / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"train:\n  steps: {steps}\n")
    log = ProgressLog(run, steps, 1, True)
    for step, loss in logged:
        log.step(step, 8, {"loss": loss, "reconstruction": loss / 2, "consistency": loss * 2})
    for step in checkpoints:
        (run / f"checkpoint_{step:06d}").mkdir()
        (run / f"checkpoint_{step:06d}" / "state.json").write_text(json.dumps({"step": step}))
    return run


def test_runs_are_listed_newest_first_with_step_loss_and_latest_checkpoint(tmp_path):
    old = _run(tmp_path, "old", 10, [(5, 0.9), (10, 0.4)], [5, 10])
    os.utime(old / "metrics.csv", (1, 1))
    for path in [old / "config.yaml", *old.glob("checkpoint_*")]:
        os.utime(path, (1, 1))
    _run(tmp_path, "new", 100, [(10, 0.7)], [])
    (tmp_path / "not-a-run").mkdir()
    runs = list_runs(tmp_path)
    assert [(r.name, r.step, r.steps, r.loss, r.checkpoint_step) for r in runs] == [
        ("new", 10, 100, 0.7, None), ("old", 10, 10, 0.4, 10)]
    assert latest_checkpoint(old) == (old / "checkpoint_000010", 10)


def test_the_loss_curve_is_a_png_of_the_logged_steps(tmp_path):
    run = _run(tmp_path, "curve", 3, [(1, 0.9), (2, 0.5), (3, 0.3)], [])
    out = plot_losses(run / "metrics.csv", run / "loss.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_losses(tmp_path / "none.csv", tmp_path / "none.png") is None
