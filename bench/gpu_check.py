"""`make gpu-check`: every GPU path proven on one CUDA machine with one command, and a report.

Runs, one after another, each under its own time limit (the sum fits 8 minutes on one
H100/H200):
- tests:     every test marked `gpu` (`pytest -m gpu tests`), with a JUnit XML of the outcome;
- attention: bench/gpu_attention.py (the Triton kernels against SDPA, Flex and the roofline)
             at D 64 and 128, N 1024 and 4096;
- tables:    bench/tables_bench.py on the GPU (our sharded tables with FBGEMM's fused kernel
             against nn.EmbeddingBag(sparse=True) + SparseAdam and the DDP peer's tables), one
             worker, 10^5 and 10^6 rows.
and writes report.json and report.md into --out (default bench/results/gpu-check): per step
its command, exit status, seconds, and what it measured (test counts; the benchmarks' JSON
lines). Exit status 0 only if every step passed.

Without a CUDA GPU it runs nothing: it says so in one line and exits with status 2 at once.

    .venv/bin/python bench/gpu_check.py [--out DIR] [--only tests attention tables]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu-check"
BUDGET_S = 480  # the whole check, on one H100/H200
NO_GPU_STATUS = 2


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    timeout_s: int


@dataclass
class Outcome:
    name: str
    command: str
    returncode: int | None  # None: stopped at its time limit
    seconds: float
    measured: dict = field(default_factory=dict)
    tail: str = ""  # the end of its output when it failed

    @property
    def passed(self) -> bool:
        return self.returncode == 0


def plan_steps(out: Path, python: str = sys.executable) -> list[Step]:
    """The check's steps; their time limits add up to BUDGET_S."""
    return [
        Step("tests", (python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                       f"--junitxml={out / 'gpu-tests.xml'}", str(ROOT / "tests")), 270),
        Step("attention", (python, str(ROOT / "bench" / "gpu_attention.py"), "--head-dims", "64", "128",
                           "--sizes", "1024", "4096"), 150),
        Step("tables", (python, str(ROOT / "bench" / "tables_bench.py"), "--device", "cuda",
                        "--workers", "1", "--rows", "100000", "1000000"), 60),
    ]


def junit_counts(path: Path) -> dict[str, int]:
    """Counts of a pytest JUnit XML file: tests, passed, failures, errors, skipped."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def json_lines(text: str) -> list[dict]:
    """The JSON objects among a benchmark's output lines (the other lines are its chatter)."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_step(step: Step, out: Path) -> Outcome:
    """Runs one step as a child process, stopped at its time limit; what it measured parsed."""
    junit = out / "gpu-tests.xml"
    junit.unlink(missing_ok=True)  # a report of an earlier check must not pass for this one's
    started = time.perf_counter()
    try:
        done = subprocess.run(step.argv, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as err:
        returncode = None
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    outcome = Outcome(step.name, " ".join(step.argv), returncode, round(time.perf_counter() - started, 1))
    (out / f"{step.name}.log").write_text(stdout + stderr)
    if step.name == "tests" and junit.exists():
        outcome.measured = junit_counts(junit)
    elif step.name != "tests":
        outcome.measured = {"records": json_lines(stdout)}
    if not outcome.passed:
        outcome.tail = (stdout + stderr)[-2000:]
    return outcome


def render_markdown(device: str, outcomes: list[Outcome]) -> str:
    """The report a person reads: one row per step, then each benchmark's summary lines."""
    lines = [f"# gpu-check on {device}", "",
             "| step | result | seconds | measured |", "|---|---|---|---|"]
    for o in outcomes:
        result = "passed" if o.passed else ("timed out" if o.returncode is None else f"failed ({o.returncode})")
        if o.name == "tests":
            measured = ", ".join(f"{v} {k}" for k, v in o.measured.items())
        else:
            measured = f"{len(o.measured.get('records', []))} JSON lines"
        lines.append(f"| {o.name} | {result} | {o.seconds} | {measured} |")
    for o in outcomes:
        summaries = [r for r in o.measured.get("records", [])
                     if str(r.get("bench", "")).endswith("_summary") or "summary" in r]
        if summaries:
            lines += ["", f"## {o.name}", ""] + [f"    {json.dumps(r)}" for r in summaries]
        if o.tail:
            lines += ["", f"## {o.name}: end of its output", "", "```", o.tail, "```"]
    lines += ["", "Commands:", ""] + [f"    {o.command}" for o in outcomes]
    return "\n".join(lines) + "\n"


def write_report(out: Path, device: str, outcomes: list[Outcome]) -> None:
    report = {"device": device, "passed": all(o.passed for o in outcomes),
              "seconds": round(sum(o.seconds for o in outcomes), 1),
              "steps": [{"name": o.name, "command": o.command, "returncode": o.returncode,
                         "seconds": o.seconds, "measured": o.measured} for o in outcomes]}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_markdown(device, outcomes))


def cuda_device() -> str | None:
    """The first CUDA device's name, or None where torch sees none."""
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", nargs="+", choices=[s.name for s in plan_steps(DEFAULT_OUT)])
    args = parser.parse_args(argv)
    device = cuda_device()
    if device is None:
        import torch
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False); "
              f"nothing was run. Run it on a machine with an NVIDIA GPU, set up with UMASK_ACCEL=cuda.",
              file=sys.stderr)
        return NO_GPU_STATUS
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for step in plan_steps(args.out):
        if args.only and step.name not in args.only:
            continue
        print(f"gpu-check: {step.name} (at most {step.timeout_s} s) ...", flush=True)
        outcomes.append(run_step(step, args.out))
        print(f"gpu-check: {step.name}: {'passed' if outcomes[-1].passed else 'FAILED'} "
              f"in {outcomes[-1].seconds} s", flush=True)
    write_report(args.out, device, outcomes)
    print(f"gpu-check: report in {args.out / 'report.md'}", flush=True)
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
