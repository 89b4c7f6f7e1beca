"""`u-mask`: the command line. Each command lives in the module that does its work.

Every command module exposes `register(subparsers)`, which adds its parser and sets
`handler(args)`. Config-driven commands take `--config FILE` (repeatable) and trailing
`key=value` overrides. A UserError prints as one message, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from umask.errors import UserError

# (group, module); group None = top-level command
COMMAND_MODULES = [
    ("data", "trainer.data.synth"),
    ("data", "trainer.data.tsinghua"),
    ("data", "trainer.data.featurize"),
    ("data", "trainer.data.summary"),
    (None, "trainer.config_cmd"),
    (None, "trainer.launch"),
    (None, "trainer.model_info"),
    (None, "trainer.evaluate"),
    (None, "trainer.complete"),
]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE (repeatable, merged in order) and key=value overrides."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config; repeat to merge several (later wins)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a config key, e.g. train.steps=20")


def config_from_args(args):
    from trainer.config import load_config
    return load_config(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="u-mask", description="Train and serve U-MASK models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {"data": commands.add_parser("data", help="import, synthesize and featurize data")
              .add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")}
    for group, module in COMMAND_MODULES:
        importlib.import_module(module).register(groups[group] if group else commands)
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
