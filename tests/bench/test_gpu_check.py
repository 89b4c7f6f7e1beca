"""bench/gpu_check.py's CPU side: the refusal without a GPU, the steps it plans, its report."""
import json
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_runs_nothing_and_says_so(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == gpu_check.NO_GPU_STATUS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU here" in err and "nothing was run" in err
    assert not (tmp_path / "r").exists()


def test_steps_cover_every_gpu_test_and_both_gpu_benchmarks_within_the_budget(tmp_path):
    steps = {s.name: s for s in gpu_check.plan_steps(tmp_path)}
    assert set(steps) == {"tests", "attention", "tables"}
    assert sum(s.timeout_s for s in steps.values()) <= gpu_check.BUDGET_S <= 8 * 60
    tests = steps["tests"].argv
    assert tests[tests.index("-m", 2) + 1] == "gpu" and tests[-1] == str(ROOT / "tests")
    for name, script in (("attention", "gpu_attention.py"), ("tables", "tables_bench.py")):
        assert (ROOT / "bench" / script).exists() and steps[name].argv[1].endswith(script)
    assert steps["tables"].argv[steps["tables"].argv.index("--device") + 1] == "cuda"


# What pytest 8 writes with --junitxml for one passed, one failed and one skipped gpu test.
JUNIT = ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" '
         'errors="0" failures="1" skipped="1" tests="3" time="0.615"><testcase classname="test_two" '
         'name="test_a" time="0.000" /><testcase classname="test_two" name="test_b" time="0.000"><failure '
         'message="assert False">E       assert False</failure></testcase><testcase classname="test_two" '
         'name="test_c" time="0.000"><skipped type="pytest.skip" message="x">x</skipped></testcase>'
         '</testsuite></testsuites>')


def test_a_failing_and_a_passing_step_make_a_report(tmp_path):
    # child processes standing in for pytest and a benchmark: their outputs as those write them
    tests = gpu_check.Step("tests", (sys.executable, "-c", f"import pathlib, sys; pathlib.Path("
                                     f"{str(tmp_path / 'gpu-tests.xml')!r}).write_text({JUNIT!r}); "
                                     f"print('E       assert False'); sys.exit(1)"), 60)
    bench = gpu_check.Step("attention", (sys.executable, "-c", "import json; print('compiling'); "
                                         "print(json.dumps({'bench': 'x', 'ms': 1.5})); "
                                         "print(json.dumps({'bench': 'x_summary', 'best': 2}))"), 60)
    outcomes = [gpu_check.run_step(step, tmp_path) for step in (tests, bench)]
    assert outcomes[0].returncode == 1 and outcomes[0].measured == {
        "tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1}
    assert "assert False" in outcomes[0].tail
    assert outcomes[1].passed and outcomes[1].measured["records"][1] == {"bench": "x_summary", "best": 2}
    gpu_check.write_report(tmp_path, "NVIDIA H200", outcomes)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False and [s["name"] for s in report["steps"]] == ["tests", "attention"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| tests | failed (1) |" in markdown and "1 passed" in markdown and "| attention | passed |" in markdown
    assert '{"bench": "x_summary", "best": 2}' in markdown


def test_a_step_past_its_limit_is_stopped_and_reported(tmp_path):
    step = gpu_check.Step("tables", (sys.executable, "-c", "import time; print('{\"a\": 1}', flush=True); "
                                     "time.sleep(30)"), 2)
    outcome = gpu_check.run_step(step, tmp_path)
    assert outcome.returncode is None and not outcome.passed and outcome.seconds < 20
    gpu_check.write_report(tmp_path, "NVIDIA H100", [outcome])
    assert "| tables | timed out |" in (tmp_path / "report.md").read_text()
