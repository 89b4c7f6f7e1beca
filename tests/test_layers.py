"""Imports follow the layers: umask/ (torch only) <- embeddings/ <- trainer/, and the CLI on top.

- umask/ and embeddings/ never import trainer/ (umask/ installs on its own and imports none
  of the training system; embeddings/ is the sparse side that trainer/ builds on);
- the data package (trainer/data/) is a library: it imports neither trainer.cli nor argparse;
- the CLI imports its commands' modules inside the handlers, so building the parser and the
  light `u-mask config` import neither torch nor Ray.

Imports are read with `ast` from every file, those inside functions included.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module an `import` or `from ... import` in `path` names, as an absolute dotted name."""
    package = ".".join(path.relative_to(root).parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from trainer import cli`
    return names


def offending(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> dict[str, list[str]]:
    """{file: the forbidden modules it imports} over every .py file under `folder`."""
    found = {}
    for path in sorted((root / folder).rglob("*.py")):
        hits = sorted(m for m in imported_modules(path, root)
                      if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            found[path.relative_to(root).as_posix()] = hits
    return found


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "umask" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text(
        "import os\nfrom trainer import cli\n"
        "def f():\n    import trainer.data.loader\n    from .. import spec\n    from .x import y\n")
    assert imported_modules(pkg / "mod.py", tmp_path) >= {
        "os", "trainer", "trainer.cli", "trainer.data.loader", "umask.spec", "umask.sub.x"}
    assert offending("umask", ("trainer",), tmp_path) == {
        "umask/sub/mod.py": ["trainer", "trainer.cli", "trainer.data.loader"]}


def test_lower_layers_do_not_import_trainer():
    assert {**offending("umask", ("trainer",)), **offending("embeddings", ("trainer",))} == {}


def test_umask_needs_nothing_of_the_training_system():
    """umask/ installs on its own as the export bundle's loader (umask/pyproject.toml: torch,
    safetensors, numpy, pyarrow; triton and tqdm optional), so it may not import the training
    system or what it does not list."""
    assert offending("umask", ("trainer", "embeddings", "ray", "deepspeed", "torchrec", "fbgemm_gpu",
                               "omegaconf", "matplotlib")) == {}


def test_the_data_package_does_not_import_the_cli():
    assert offending("trainer/data", ("trainer.cli", "argparse")) == {}


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs trainer.cli.main(argv) in a fresh interpreter; at exit it prints which of torch and
    ray were imported, as the last line of stdout."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('heavy:', [m for m in ('torch', 'ray') if m in sys.modules]))\n"
        "from trainer.cli import main\n"
        f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("argv", [
    ["config", "--config", "configs/tiny.yaml"],
    ["--help"],
    ["data", "synth", "--help"],
    ["eval", "--help"],
    ["export", "--help"],
    ["embed-users", "--help"],
    ["--version"],
    ["runs", "--storage", "no-such-folder"],
])
def test_the_cli_imports_neither_torch_nor_ray_until_a_command_needs_them(argv):
    done = run_cli(argv)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "heavy: []", done.stdout[-2000:]
    assert len(lines) > 1  # the command printed something before the exit hook


def test_python_dash_m_trainer_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "trainer", "config", "--config", "configs/tiny.yaml",
                           "train.steps=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["train"]["steps"] == 3
