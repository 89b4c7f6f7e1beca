"""The working_dir upload of `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`.

Built with Ray's own packaging (the functions `ray job submit` calls, with Ray's default excludes
added to ours), then compared with what git sees in the checkout. Ray matches excludes with
.gitignore rules, so an unanchored `data` once dropped the package trainer/data/ from the upload.
"""
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from ray._private.runtime_env.packaging import create_package
from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

REPO = Path(__file__).resolve().parents[2]
KEPT_OUT = (".git/", ".venv/", "data/", "runs/", "export/", "bench/results/")


def _upload(tmp_path: Path, include_gitignore: bool) -> set[str]:
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    package = tmp_path / f"upload-{include_gitignore}.zip"

    def build(working_dir, excludes, is_file=False):  # what the job client does before its PUT
        create_package(working_dir, package, include_gitignore=include_gitignore, excludes=excludes)

    upload_working_dir_if_needed(runtime_env, include_gitignore=include_gitignore, upload_fn=build)
    assert package.stat().st_size < 20 * 2**20, f"the upload is {package.stat().st_size / 2**20:.0f} MiB"
    return set(zipfile.ZipFile(package).namelist())


def _source_files() -> list[str]:
    """Every file git would commit in the checkout: tracked, plus untracked ones not ignored."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"needs the git checkout to know the source files: {err}")
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.mark.parametrize("include_gitignore", [True, False],
                         ids=["default", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1"])
def test_upload_holds_every_source_file_and_no_data(tmp_path, include_gitignore):
    uploaded = _upload(tmp_path, include_gitignore)
    sources = _source_files()
    assert any(name.startswith("trainer/data/") for name in sources)
    missing = sorted(set(sources) - uploaded)
    assert not missing, f"{len(missing)} source files are not uploaded: {missing[:20]}"
    leaked = sorted(name for name in uploaded if name.startswith(KEPT_OUT))
    assert not leaked, f"the upload holds data, runs or the virtualenv: {leaked[:20]}"
