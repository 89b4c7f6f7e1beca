"""`u-mask`: the command line. Every command's parser and handler is here, and only here.

A handler is thin: it checks the parsed flags, calls the library function that does the work
(trainer.data.synth.synthesize, trainer.data.featurize.featurize, trainer.training.launch.train,
trainer.inference.evaluate.evaluate_checkpoint, ...) and prints the result. The library modules know nothing of
argparse or of this module. Handlers import their library modules inside the function, so
building the parser (`u-mask --help`) and light commands (`u-mask config`) import neither torch
nor Ray. One module rather than a package: each command is a dozen lines, and the whole CLI
reads in one place.

Config-driven commands take `--config FILE` (repeatable) and trailing `key=value` overrides.
A UserError prints as one message, not a traceback, and the exit status is 2.

What a person sees: each command's own lines on stdout; long work shows a progress bar on a
terminal and, off a terminal, a plain line at most every few seconds (trainer/console.py);
the libraries' logs go to files unless `--verbose` (or U_MASK_VERBOSE=1) asks for them
(trainer/training/worker_logs.py). Commands that make something end with where it is and the
next commands to run on it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from umask.errors import UserError


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description on its own, and appends each option's default
    when it has one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n\n".join(textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                                         subsequent_indent=indent) for p in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == []
                     or action.default == argparse.SUPPRESS)  # 0 is shown: `in (False, ...)` would hide it
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE (repeatable, merged in order) and key=value overrides."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML preset, e.g. configs/tiny.yaml; repeat to merge several (later "
                             "wins); without it, the built-in defaults of trainer/config.py")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a config key, e.g. train.steps=20 (`u-mask config` lists every key)")


def add_verbose_argument(parser: argparse.ArgumentParser,
                         text: str = "show the libraries' own log lines too (also: U_MASK_VERBOSE=1)") -> None:
    parser.add_argument("--verbose", action="store_true", default=None, help=text)


def config_from_args(args):
    from trainer.config import load_config

    if not args.config:  # the defaults' paths (data/synth, runs/umask) are rarely what was meant
        print("u-mask: note: no --config given, so the built-in defaults of trainer/config.py apply "
              "(data.source=data/synth); presets: configs/tiny.yaml, configs/base.yaml, configs/xl.yaml",
              file=sys.stderr)
    return load_config(args.config, args.overrides)


def _shown(path: str | Path) -> str:
    """`path` relative to the working directory when it lies under it (shorter to read and paste)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The named flags the user gave; the library function's defaults stand for the others."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


# --- u-mask data ...  (trainer/data) ----------------------------------------------------------

def _add_synth(commands) -> None:
    parser = commands.add_parser(
        "synth", help="write a synthetic dataset in the data contract",
        description="Write synthetic users (personas with daily and weekly routines) as "
                    "contract Parquet: events/, apps.parquet, locations.parquet, profiles.parquet.")
    parser.add_argument("--out", required=True,
                        help="output directory: new, empty or an earlier synth output")
    parser.add_argument("--users", type=int, required=True, help="number of users")
    # the defaults are synthesize()'s (tests/test_cli.py checks that they agree)
    parser.add_argument("--days", type=int, default=28, help="length of the window in days")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same Parquet content")
    parser.add_argument("--apps", type=int, default=2000, help="apps in the catalog")
    parser.add_argument("--locations", type=int, default=500, help="places (cells) in the city")
    parser.add_argument("--start", default="2026-11-02",
                        help="first hour of the window, UTC (YYYY-MM-DD or YYYY-MM-DDTHH:00)")
    parser.add_argument("--workers", type=int, default=1, help="processes generating chunks")
    parser.add_argument("--generator", choices=("personas", "metro"), default="personas",
                        help="personas: routines of 20 categories (trainer/data/synth.py); metro: "
                             "an independently written source with 18 categories and 12 regions "
                             "(trainer/data/synth_metro.py)")
    parser.set_defaults(handler=_synth)


def _synth(args) -> int:
    from trainer.console import Progress
    from trainer.data.synth import synthesize

    if args.generator == "metro":
        from trainer.data.synth_metro import synthesize_metro

        if args.workers != 1:
            raise UserError("synth: --workers applies to --generator personas only")
        with Progress("synth", "users") as progress:
            summary = synthesize_metro(args.out, users=args.users, on_progress=progress.update,
                                       **_given(args, "days", "seed", "apps", "locations", "start"))
        print(summary.line(Path(args.out)))
        return 0
    with Progress("synth", "users") as progress:
        summary = synthesize(args.out, users=args.users, on_progress=progress.update,
                             **_given(args, "days", "seed", "apps", "locations", "start", "workers"))
    print(summary.line(Path(args.out)))
    return 0


def _add_import_tsinghua(commands) -> None:
    parser = commands.add_parser(
        "import-tsinghua", help="convert the Tsinghua App Usage text files into a contract dataset",
        description="Convert the public Tsinghua App Usage dataset (text files) into a contract "
                    "dataset (docs/data-contract.md shows both, with samples): events/ with times "
                    "converted to UTC, apps.parquet with the categories numbered from 0 (it prints "
                    "the data.num_categories to set), locations.parquet with the POI counts and no "
                    "coordinates, so featurize makes no regions.")
    parser.add_argument("--src", required=True, type=Path,
                        help="folder holding App_usage_trace.txt (and App2Category.txt, base_poi.txt)")
    parser.add_argument("--out", required=True, type=Path,
                        help="new dataset folder (must not exist or be empty)")
    # the defaults are import_tsinghua()'s (tests/test_cli.py checks that they agree)
    parser.add_argument("--utc-offset-hours", type=int, default=8,
                        help="time zone of the trace's local times (8: China)")
    parser.add_argument("--rows-per-file", type=int, default=5_000_000, help="events per output Parquet file")
    parser.add_argument("--poi-regions", type=int, metavar="K",
                        help="give the base stations K regions, clusters of their POI profiles "
                             "(the data has no coordinates; without this, no regions)")
    parser.set_defaults(handler=_import_tsinghua)


def _import_tsinghua(args) -> int:
    from trainer.console import Progress
    from trainer.data.tsinghua import import_tsinghua

    with Progress("import", "bytes") as progress:
        summary = import_tsinghua(args.src, args.out, on_progress=progress.update,
                                  **_given(args, "utc_offset_hours", "rows_per_file", "poi_regions"))
    for line in summary.lines():
        print(line)
    print(f"wrote {args.out}")
    return 0


def _add_featurize(commands) -> None:
    parser = commands.add_parser(
        "featurize", help="turn contract events into training examples",
        description="Turn the contract dataset data.source into per-user examples in data.features: "
                    "the examples by split and shard, manifest.json, the feature spec (spec/) and the "
                    "resolved config. Invalid rows follow data.invalid_rows (quarantine or strict).")
    add_config_arguments(parser)
    parser.set_defaults(handler=_featurize)


def _featurize(args) -> int:
    import contextlib

    from trainer.console import Progress
    from trainer.data.featurize import featurize
    from trainer.training.cluster import require_absolute_under_job

    cfg = config_from_args(args)
    require_absolute_under_job(**{"data.features": cfg.data.features})
    with contextlib.ExitStack() as stack:
        bars = {}  # one per phase, started with it, so that its rate and ETA are the phase's own

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = stack.enter_context(Progress(f"featurize ({phase})", "events"))
            bars[phase].update(done, total)

        manifest = featurize(cfg, on_progress=on_progress)
    examples, users, events = manifest["examples"], manifest["users"], manifest["events"]
    print(f"featurized {events['featurized']} events ({events['duplicates_dropped']} duplicates "
          f"dropped, {manifest['quarantine']['rows_quarantined']} rows quarantined) into "
          f"{sum(examples.values())} examples of {sum(users.values())} users ("
          + ", ".join(f"{s} {n}" for s, n in examples.items()) + f") in {cfg.data.features}")
    run, tasks = manifest["run"], manifest["run"]["tasks"]
    if run["on_ray"]:  # a small input ran in this process: its memory is not news
        print(f"peak RSS: driver {run['driver_peak_rss_mb']:.0f} MB; tasks at most "
              f"{max(t['peak_rss_mb'] for t in tasks['read']):.0f} MB reading, "
              f"{max(t['peak_rss_mb'] for t in tasks['featurize']):.0f} MB featurizing "
              f"(data.task_memory_mb={run['task_memory_mb']}; every task's in manifest.json)")
    return 0


def _add_summary(commands) -> None:
    parser = commands.add_parser(
        "summary", help="summarize featurized data (also as summary.json)",
        description="Print users and examples per split, the share of observed slots (quantiles and "
                    "sparsity buckets), the most used categories and the regions of data.features, "
                    "and write them to <features>/summary.json.")
    add_config_arguments(parser)
    parser.set_defaults(handler=_summary)


def _summary(args) -> int:
    import json

    from trainer.data.summary import format_summary, summarize

    features = Path(config_from_args(args).data.features)
    summary = summarize(features)
    (features / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    return 0


# --- u-mask config | train | model-info  (trainer/config.py, trainer/training/launch.py) --------------

def _add_config(commands) -> None:
    parser = commands.add_parser(
        "config", help="print the resolved config (validates it)",
        description="Print the config that --config files and key=value overrides resolve to, with "
                    "every key and its value; a wrong key, type or value is an error naming the key "
                    "and where it was set.")
    add_config_arguments(parser)
    parser.set_defaults(handler=_config)


def _config(args) -> int:
    from trainer.config import to_yaml

    print(to_yaml(config_from_args(args)), end="")
    return 0


def _add_train(commands) -> None:
    parser = commands.add_parser(
        "train", help="train U-MASK on Ray (embedded Ray unless RAY_ADDRESS is set)",
        formatter_class=HelpFormatter,
        description="Train U-MASK on Ray: an embedded Ray on this machine, or the cluster named by "
                    "RAY_ADDRESS / ray.address. Shows a progress line every train.log_every steps (a "
                    "bar on a terminal) and ends with the checkpoint and the next commands. Rerunning "
                    "with the same ray.name resumes from its latest checkpoint.\n\n"
                    "The run folder <ray.storage_path>/<ray.name> gets config.yaml, plan.json and plan.txt "
                    "(where each table went and why, as printed at the start), "
                    "metrics.csv, TensorBoard event files, loss.png, checkpoint_*/ and logs/rank-<r>.log "
                    "(the workers' and libraries' output).")
    add_config_arguments(parser)
    add_verbose_argument(parser, "show the workers' and libraries' logs here instead of in "
                                 "logs/rank-<r>.log (also: U_MASK_VERBOSE=1)")
    parser.set_defaults(handler=_train)


def _train(args) -> int:
    from trainer.console import TrainingDisplay
    from trainer.training.launch import train
    from trainer.training.runs import latest_checkpoint, plot_losses, read_metrics

    cfg = config_from_args(args)
    run_dir = Path(cfg.ray.storage_path) / cfg.ray.name
    resumed = latest_checkpoint(run_dir) if cfg.train.resume and "://" not in cfg.ray.storage_path else None
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    print(f"training {cfg.ray.name}: {cfg.train.steps} steps of {cfg.ray.num_workers} x "
          f"{cfg.train.batch_size} examples on {'the Ray cluster at ' + address if address else 'an embedded Ray'}"
          + (f", resuming at step {resumed[1]}" if resumed else "") + f"; run folder {_shown(run_dir)}",
          flush=True)
    display = TrainingDisplay(cfg.train.steps, resumed[1] if resumed else 0, plan=run_dir / "plan.txt")
    started = time.perf_counter()
    try:
        train(cfg, verbose=args.verbose, on_row=display.row)  # Ray Train raises on failure
    finally:
        display.close()
    rows = read_metrics(run_dir / "metrics.csv")
    plot = plot_losses(run_dir / "metrics.csv", run_dir / "loss.png")
    checkpoint = latest_checkpoint(run_dir)
    last = rows[-1] if rows else {}
    memory, *report = run_report(last)
    print(f"done in {time.perf_counter() - started:.0f} s: step {last.get('step', '?')}/{cfg.train.steps}, "
          f"loss {float(last['loss']):.4f}" if last.get("loss") else "done: no step was logged", end="")
    if checkpoint is None:
        print(f"; no checkpoint in {_shown(run_dir)} yet; {memory}")
        return 0
    print(f"; checkpoint {_shown(checkpoint[0])}; {memory}")
    for line in report:
        print(line)
    for line in next_commands(args, cfg, run_dir, plot):
        print(line)
    return 0


def run_report(last: dict[str, str]) -> list[str]:
    """What the run's last metrics.csv row says about memory and ids: each worker's peak
    resident memory and this driver's, and the off-contract (negative) ids seen, if any."""
    from trainer.training.memory import GIB, peak_rss_bytes

    workers = [f"rank {name.removeprefix('peak_rss_gb_rank')} {float(value):.2f}"
               for name, value in last.items() if name.startswith("peak_rss_gb_rank") and value]
    lines = [f"peak resident memory: {', '.join(workers) or 'workers not recorded'} GiB; "
             f"driver {peak_rss_bytes() / GIB:.2f} GiB"]
    negative = {key: float(last.get(f"out_of_contract_{key}") or 0) for key in ("app", "loc")}
    if any(negative.values()):
        lines.append(f"off-contract ids: app {negative['app']:.0f}, loc {negative['loc']:.0f} negative ids "
                     "were hashed like any id (not dropped, not clipped); see out_of_contract_* in metrics.csv")
    return lines


def next_commands(args, cfg, run_dir: Path, plot: Path | None) -> list[str]:
    """The closing lines of `u-mask train`: where things are and the exact next commands."""
    run = shlex.quote(_shown(run_dir))
    events = shlex.quote(_shown(cfg.data.source))
    again = ["u-mask", "train", *(part for c in args.config for part in ("--config", c)),
             *(o for o in args.overrides if not o.startswith("train.steps=")), f"train.steps={2 * cfg.train.steps}"]
    lines = [f"metrics: {_shown(run_dir / 'metrics.csv')}" + (f", loss curve {_shown(plot)}" if plot else "")
             + ", TensorBoard: tensorboard --logdir " + shlex.quote(_shown(run_dir.parent)),
             "next:",
             f"  u-mask eval --checkpoint {run} --split test --out {shlex.quote(_shown(run_dir / 'eval-test'))}",
             f"  u-mask complete --checkpoint {run} --events {events} --task short "
             f"--out {shlex.quote(_shown(run_dir / 'completed'))}",
             f"  {shlex.join(again)}"
             "   # resumes this run and trains on"]
    if "export" in _command_names():
        lines.insert(-1, f"  u-mask export --checkpoint {run} --out {shlex.quote(_shown(run_dir / 'bundle'))}")
    return lines


def _command_names() -> set[str]:
    return {name for add in COMMANDS for name in [add.__name__.removeprefix("_add_").replace("_", "-")]}


def _add_model_info(commands) -> None:
    parser = commands.add_parser(
        "model-info", help="print parameter counts of the configured model size",
        description="Print the parameter counts of the model a config describes (configs/tiny.yaml, "
                    "configs/base.yaml, configs/xl.yaml), without allocating it.")
    add_config_arguments(parser)
    parser.set_defaults(handler=_model_info)


def _model_info(args) -> int:
    from trainer.training.model_info import model_parameter_counts

    cfg = config_from_args(args)
    counts = model_parameter_counts(cfg)
    print(f"model size {cfg.model.size!r} (configs/model/{cfg.model.size}.yaml): hidden={cfg.model.hidden} "
          f"depth={cfg.model.depth} heads={cfg.model.heads}")
    for name, count in counts.items():
        print(f"  {name:<16} {count:>15,}")
    return 0


# --- u-mask eval | complete  (a trained model: trainer/inference/evaluate.py, trainer/inference/complete.py) ------

def _add_eval(commands) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate a checkpoint against the baselines (JSON + PNG)", formatter_class=HelpFormatter,
        description="Score a checkpoint on held-out users (--split test) or cold-start users (--split "
                    "cold) against U-MASK with uniform masks, the untrained model, the learned "
                    "baseline (--baseline-checkpoint), global popularity, the user's own hour-of-week "
                    "and hour-of-day means and the last observed value, per task (short, long, cold) "
                    "and sparsity bucket, all from the same evidence (docs/evaluation.md).\n\n"
                    "Prints category MRR per task and method and a line naming each method and metric "
                    "U-MASK is behind by the paired 95% intervals over users; writes "
                    "report.json (every metric, bucket, interval and finding), report.md and one PNG "
                    "per task into --out, and the scores to TensorBoard in the run folder.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--data", help="featurize output to evaluate (default: the checkpoint "
                                       "config's data.features)")
    parser.add_argument("--split", default="test", choices=("test", "cold", "val"),
                        help="which users: held out (test, val) or held out as cold-start (cold)")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and PNGs")
    parser.add_argument("--samples", type=int, default=1, help="sampler seeds to average over")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: model.diffusion.sample_steps)")
    parser.add_argument("--uniform-checkpoint",
                        help="a run trained with model.mask.family=uniform: it completes the "
                             "umask_uniform_mask row (default: the same weights as --checkpoint)")
    parser.add_argument("--baseline-checkpoint",
                        help="a run trained with model.backbone=mae on the same features: the "
                             "learned baseline's row (mae)")
    parser.add_argument("--batches", type=int, help="evaluate at most this many batches")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    parser.add_argument("--seed", type=int, default=0, help="seeds the masks and the sampler")
    parser.add_argument("--popularity-batches", type=int, default=50,
                        help="training batches the global popularity baseline averages")
    add_verbose_argument(parser)
    parser.set_defaults(handler=_eval)


def _eval(args) -> int:
    for name in ("samples", "batch_size", "popularity_batches", "steps", "batches"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    from trainer.console import Progress
    from trainer.inference.evaluate import EvalSettings, evaluate_checkpoint, headline

    settings = EvalSettings(split=args.split, samples=args.samples, steps=args.steps,
                            batches=args.batches, batch_size=args.batch_size, seed=args.seed,
                            popularity_batches=args.popularity_batches)
    with Progress("eval", "batches") as progress:
        report = evaluate_checkpoint(args.checkpoint, args.out, settings, args.data, args.uniform_checkpoint,
                                     progress.update, args.baseline_checkpoint)
    out = Path(args.out)
    print("\n".join(headline(report)))
    print(f"wrote {_shown(out / 'report.json')} ({report['examples']} examples of {report['users']} users, "
          f"checkpoint step {report['step']}), report.md (every metric, bucket and interval) and plots "
          + ", ".join(_shown(out / f"{task}.png") for task in report["tasks"])
          + f"; TensorBoard: {_shown(report['tensorboard'])}")
    return 0


def _add_complete(commands) -> None:
    parser = commands.add_parser(
        "complete", help="complete users' latest week for a task with a checkpoint",
        description="Complete each user's latest window of a contract events file with a checkpoint "
                    "(docs/after-the-demo.md): prints the target slots per "
                    "user and writes completed.parquet, one row per user and slot, its dense channels "
                    "named in the file's metadata.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--events", required=True,
                        help="contract events: a dataset folder, an events directory or a Parquet file")
    parser.add_argument("--task", required=True, choices=("short", "long", "cold"),
                        help="short: the next few slots; long: up to model.mask.long.target_max slots "
                             "ahead; cold: everything after the first day, from one day of history")
    parser.add_argument("--out", required=True, help="folder for completed.parquet")
    parser.add_argument("--cut", type=int, help="first target slot for every user (default: per task)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: model.diffusion.sample_steps)")
    parser.add_argument("--evidence", choices=("sampled", "all"), default="sampled",
                        help="what the model sees of the history before the cut: the share its "
                             "adaptive mask samples, as in training, or every observed slot")
    parser.add_argument("--seed", type=int, default=0, help="seeds the evidence mask and the sampler")
    parser.add_argument("--show", type=int, default=5,
                        help="users whose target slots print here (completed.parquet has them all)")
    add_verbose_argument(parser)
    parser.set_defaults(handler=_complete)


def _complete(args) -> int:
    from trainer.inference.complete import complete_checkpoint

    if args.show < 0:
        raise UserError(f"--show must be 0 or more, got {args.show}")
    done = complete_checkpoint(args.checkpoint, args.events, args.task, args.out, args.cut,
                               args.steps, args.seed, args.evidence, args.show)
    print(done.readable)
    print(f"wrote {_shown(done.path)} ({done.users} users, checkpoint step {done.step}): one row per user "
          "and slot; the dense channels' names are in its metadata (docs/after-the-demo.md)")
    return 0


# --- u-mask runs  (trainer/training/runs.py) ---------------------------------------------------

def _add_runs(commands) -> None:
    parser = commands.add_parser(
        "runs", help="list the training runs in a storage path, newest first",
        formatter_class=HelpFormatter,
        description="List the runs in a storage path (ray.storage_path), newest first: the last "
                    "logged step and loss, the steps configured and the latest checkpoint.")
    parser.add_argument("--storage", default="runs", help="the storage path holding the run folders")
    parser.set_defaults(handler=_runs)


def _runs(args) -> int:
    from trainer.training.runs import list_runs

    runs = list_runs(Path(args.storage))
    if not runs:
        print(f"no runs in {args.storage}")
        return 0
    print(f"{'run':<24} {'step':>11} {'loss':>8}  {'modified':<16}  latest checkpoint")
    for run in runs:
        step = f"{run.step if run.step is not None else '-'}/{run.steps if run.steps is not None else '?'}"
        loss = f"{run.loss:.4f}" if run.loss is not None else "-"
        checkpoint = (f"{_shown(run.checkpoint)} (step {run.checkpoint_step})" if run.checkpoint
                      else "none yet")
        print(f"{run.name:<24} {step:>11} {loss:>8}  "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(run.modified)):<16}  {checkpoint}")
    return 0


# --- u-mask export | embed-users  (trainer/inference/export.py; the bundle loader umask/bundle.py) -------

def _add_export(commands) -> None:
    parser = commands.add_parser("export", help="write a versioned bundle of a checkpoint for downstream teams",
                                 description="Write the export bundle of a checkpoint (docs/export.md): "
                                             "manifest.json, the feature spec, dense safetensors, Parquet "
                                             "tables and seen ids, and a torch.export program; no pickle.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="bundle folder: new, empty, or an earlier bundle to replace")
    parser.add_argument("--eval-report", help="a `u-mask eval` report.json of this checkpoint; its headline "
                                              "metrics go into the manifest")
    parser.add_argument("--features", help="the training features (default: the checkpoint config's "
                                           "data.features), read for the ids seen in training and --users")
    parser.add_argument("--users", action="store_true", help="also write users.parquet: the training users' vectors")
    parser.add_argument("--max-shard-mb", type=int, default=2048, help="largest dense safetensors file, MiB")
    parser.set_defaults(handler=_export)


def _export(args) -> int:
    if args.max_shard_mb <= 0:
        raise UserError(f"--max-shard-mb must be positive, got {args.max_shard_mb}")
    from trainer.inference.export import export_bundle

    manifest = export_bundle(args.checkpoint, args.out, eval_report=args.eval_report, features=args.features,
                             users=args.users, max_shard_bytes=args.max_shard_mb << 20)
    size = sum(entry["bytes"] for entry in manifest["files"].values())
    print(f"wrote bundle {args.out}: run {manifest['run']} step {manifest['step']}, version "
          f"{manifest['bundle_version'][:12]}, {len(manifest['files'])} files, {size / 2**20:.1f} MiB")
    print(f"next: pip install ./umask; u-mask embed-users --bundle {args.out} --events EVENTS --out users.parquet")
    return 0


def _add_embed_users(commands) -> None:
    # the loader's own command (umask/__main__.py), so teams with only umask/ installed run the same
    from umask.__main__ import add_embed_users

    add_embed_users(commands)


# --- the program ------------------------------------------------------------------------------

DATA_COMMANDS = (_add_synth, _add_import_tsinghua, _add_featurize, _add_summary)
COMMANDS = (_add_config, _add_train, _add_model_info, _add_eval, _add_complete, _add_runs, _add_export, _add_embed_users)


def version() -> str:
    """This installation's version, from the package metadata (no heavy import)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("umask-trainer")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """Every command's parser (subparsers take their parent's class): HelpFormatter by default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="u-mask", formatter_class=HelpFormatter,
        description="Train and serve U-MASK models. Quick start: make demo; every command: "
                    "u-mask COMMAND --help.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = commands.add_parser("data", help="import, synthesize and featurize data").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND")
    for add in DATA_COMMANDS:
        add(data)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.training.worker_logs import quiet_library_warnings, verbose_from_env

    if not (getattr(args, "verbose", None) or verbose_from_env()):
        quiet_library_warnings()
    try:
        return args.handler(args) or 0
    except UserError as err:
        print(f"u-mask: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
