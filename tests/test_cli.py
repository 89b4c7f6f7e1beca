"""The command line as a newcomer meets it: --help describes every command and shows the
defaults, which are the library functions' own; --version; a config command without --config
says which defaults it used."""
from __future__ import annotations

import argparse
import inspect

import pytest

from trainer.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_commands(sub, f"{prefix}{name} "))
    return found


def test_every_command_has_a_description_and_help_shows_defaults():
    commands = _commands(build_parser())
    assert {"data synth", "data import-tsinghua", "data featurize", "data summary", "config", "train",
            "model-info", "eval", "complete", "runs"} <= set(commands)
    for name, parser in commands.items():
        if name == "data":
            continue
        assert parser.description and len(parser.description) > 40, name
    synth = commands["data synth"].format_help()
    assert "(default: 28)" in " ".join(synth.split()) and "(default: 0)" in synth


@pytest.mark.parametrize("command, function, names", [
    ("data synth", "trainer.data.synth:synthesize", ("days", "seed", "apps", "locations", "start", "workers")),
    ("data import-tsinghua", "trainer.data.tsinghua:import_tsinghua", ("utc_offset_hours", "rows_per_file")),
])
def test_the_help_defaults_are_the_library_defaults(command, function, names):
    import importlib

    module, attribute = function.split(":")
    signature = inspect.signature(getattr(importlib.import_module(module), attribute))
    parser = _commands(build_parser())[command]
    defaults = {a.dest: a.default for a in parser._actions}
    for name in names:
        assert defaults[name] == signature.parameters[name].default, name


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("u-mask 0.")


def test_a_config_command_without_config_says_it_uses_the_built_in_defaults(capsys):
    assert main(["config"]) == 0
    captured = capsys.readouterr()
    assert "no --config given" in captured.err and "configs/tiny.yaml" in captured.err
    assert main(["config", "--config", "configs/tiny.yaml"]) == 0
    assert "no --config" not in capsys.readouterr().err
