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
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from umask.errors import UserError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE (repeatable, merged in order) and key=value overrides."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config; repeat to merge several (later wins)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a config key, e.g. train.steps=20")


def config_from_args(args):
    from trainer.config import load_config
    return load_config(args.config, args.overrides)


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
    parser.add_argument("--days", type=int, help="length of the window in days")
    parser.add_argument("--seed", type=int, help="same seed, same Parquet content")
    parser.add_argument("--apps", type=int, help="apps in the catalog")
    parser.add_argument("--locations", type=int, help="places (cells) in the city")
    parser.add_argument("--start",
                        help="first hour of the window, UTC (YYYY-MM-DD or YYYY-MM-DDTHH:00)")
    parser.add_argument("--workers", type=int, help="processes generating chunks")
    parser.set_defaults(handler=_synth)


def _synth(args) -> int:
    from trainer.data.synth import synthesize

    summary = synthesize(args.out, users=args.users,
                         **_given(args, "days", "seed", "apps", "locations", "start", "workers"))
    print(summary.line(Path(args.out)))
    return 0


def _add_import_tsinghua(commands) -> None:
    parser = commands.add_parser(
        "import-tsinghua", help="convert the Tsinghua App Usage text files into a contract dataset")
    parser.add_argument("--src", required=True, type=Path,
                        help="folder holding App_usage_trace.txt (and App2Category.txt, base_poi.txt)")
    parser.add_argument("--out", required=True, type=Path,
                        help="new dataset folder (must not exist or be empty)")
    parser.add_argument("--utc-offset-hours", type=int,
                        help="time zone of the trace's local times (default 8, China)")
    parser.add_argument("--rows-per-file", type=int, help="events per output Parquet file")
    parser.set_defaults(handler=_import_tsinghua)


def _import_tsinghua(args) -> int:
    from trainer.data.tsinghua import import_tsinghua

    summary = import_tsinghua(args.src, args.out, **_given(args, "utc_offset_hours", "rows_per_file"))
    for line in summary.lines():
        print(line)
    print(f"wrote {args.out}")
    return 0


def _add_featurize(commands) -> None:
    parser = commands.add_parser("featurize", help="turn contract events into training examples")
    add_config_arguments(parser)
    parser.set_defaults(handler=_featurize)


def _featurize(args) -> int:
    from trainer.data.featurize import featurize

    cfg = config_from_args(args)
    manifest = featurize(cfg)
    examples, users, events = manifest["examples"], manifest["users"], manifest["events"]
    print(f"featurized {events['featurized']} events ({events['duplicates_dropped']} duplicates "
          f"dropped, {manifest['quarantine']['rows_quarantined']} rows quarantined) into "
          f"{sum(examples.values())} examples of {sum(users.values())} users ("
          + ", ".join(f"{s} {n}" for s, n in examples.items()) + f") in {cfg.data.features}")
    return 0


def _add_summary(commands) -> None:
    parser = commands.add_parser("summary", help="summarize featurized data (also as summary.json)")
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
    parser = commands.add_parser("config", help="print the resolved config (validates it)")
    add_config_arguments(parser)
    parser.set_defaults(handler=_config)


def _config(args) -> int:
    from trainer.config import to_yaml

    print(to_yaml(config_from_args(args)), end="")
    return 0


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train U-MASK on Ray (embedded Ray unless RAY_ADDRESS is set)")
    add_config_arguments(parser)
    parser.set_defaults(handler=_train)


def _train(args) -> int:
    from trainer.training.launch import train

    result = train(config_from_args(args))
    # Ray Train raises instead of returning a failed result
    print(f"done: {result.metrics} checkpoint={result.checkpoint.path if result.checkpoint else None}")
    return 0


def _add_model_info(commands) -> None:
    parser = commands.add_parser("model-info", help="print parameter counts of the configured model size")
    add_config_arguments(parser)
    parser.set_defaults(handler=_model_info)


def _model_info(args) -> int:
    from trainer.training.model_info import model_parameter_counts

    cfg = config_from_args(args)
    counts = model_parameter_counts(cfg)
    print(f"model size {cfg.model.size!r}: hidden={cfg.model.hidden} depth={cfg.model.depth} heads={cfg.model.heads}")
    for name, count in counts.items():
        print(f"  {name:<16} {count:>15,}")
    return 0


# --- u-mask eval | complete  (a trained model: trainer/inference/evaluate.py, trainer/inference/complete.py) ------

def _add_eval(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate a checkpoint against the baselines (JSON + PNG)")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--data", help="featurize output to evaluate (default: the checkpoint "
                                       "config's data.features)")
    parser.add_argument("--split", default="test", choices=("test", "cold", "val"))
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and PNGs")
    parser.add_argument("--samples", type=int, default=1, help="sampler seeds to average over")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: model.diffusion.sample_steps)")
    parser.add_argument("--uniform-checkpoint",
                        help="a run trained with model.mask.family=uniform: it completes the "
                             "umask_uniform_mask row (default: the same weights as --checkpoint)")
    parser.add_argument("--batches", type=int, help="evaluate at most this many batches")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seeds the masks and the sampler")
    parser.add_argument("--popularity-batches", type=int, default=50,
                        help="training batches the global popularity baseline averages")
    parser.set_defaults(handler=_eval)


def _eval(args) -> int:
    for name in ("samples", "batch_size", "popularity_batches", "steps", "batches"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    from trainer.inference.evaluate import EvalSettings, evaluate_checkpoint, markdown_table

    settings = EvalSettings(split=args.split, samples=args.samples, steps=args.steps,
                            batches=args.batches, batch_size=args.batch_size, seed=args.seed,
                            popularity_batches=args.popularity_batches)
    report = evaluate_checkpoint(
        args.checkpoint, args.out, settings, args.data, args.uniform_checkpoint,
        lambda done, total: print(f"evaluated batch {done}/{total}", file=sys.stderr, flush=True))
    out = Path(args.out)
    print(markdown_table(report))
    print("\n".join(report["findings"]))
    print(f"wrote {out / 'report.json'}, report.md and {len(report['tasks'])} plots "
          f"({report['examples']} examples of {report['users']} users, checkpoint step {report['step']})")
    return 0


def _add_complete(commands) -> None:
    parser = commands.add_parser("complete", help="complete users' latest week for a task with a checkpoint")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--events", required=True,
                        help="contract events: a dataset folder, an events directory or a Parquet file")
    parser.add_argument("--task", required=True, choices=("short", "long", "cold"))
    parser.add_argument("--out", required=True, help="folder for completed.parquet")
    parser.add_argument("--cut", type=int, help="first target slot for every user (default: per task)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: model.diffusion.sample_steps)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the evidence mask and the sampler")
    parser.set_defaults(handler=_complete)


def _complete(args) -> int:
    from trainer.inference.complete import complete_checkpoint

    done = complete_checkpoint(args.checkpoint, args.events, args.task, args.out, args.cut,
                               args.steps, args.seed)
    print(done.readable)
    print(f"wrote {done.path} ({done.users} users, checkpoint step {done.step})")
    return 0


# --- the program ------------------------------------------------------------------------------

DATA_COMMANDS = (_add_synth, _add_import_tsinghua, _add_featurize, _add_summary)
COMMANDS = (_add_config, _add_train, _add_model_info, _add_eval, _add_complete)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="u-mask", description="Train and serve U-MASK models.")
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
    try:
        return args.handler(args) or 0
    except UserError as err:
        print(f"u-mask: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
