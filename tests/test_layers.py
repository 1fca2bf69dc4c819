"""The layers of docs/design.md hold: import-linter's contracts (pyproject.toml) pass on src/imgvec,
and an upward import breaks them, so CI fails on it instead of a review catching it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


def test_the_import_contracts_hold():
    out = _lint(ROOT / "src")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("module,upward", [
    ("files/artifact.py", "from imgvec.backbones import builder"),  # the file layer reaching the model builder
    ("files/structure.py", "from imgvec.files import header"),  # structure checks sit below the header
    ("backbones/registry.py", "from imgvec.backbones import device"),  # the registry is data: no runtime
    ("results.py", "from imgvec.vectors import store"),  # results take plain data
    ("runtime/openvino_engine.py", "from imgvec.runtime import tensorflow_engine"),  # engines are independent
    ("vectors/index.py", "from imgvec.cli import commands"),  # the library never imports the CLI
    ("vectors/store.py", "from imgvec.runtime import loader"),  # vectors and runtime are independent
    ("files/images.py", "from imgvec.vectors import store"),  # a package reaching the one above it
    ("analyses/duplicates.py", "from imgvec.analyses import comparison"),  # analyses are independent
    ("cli/commands.py", "from imgvec.files import images"),  # the CLI reaching past the API
    ("service/service.py", "from imgvec.service import app"),  # the service knows no HTTP
])
def test_an_upward_import_breaks_a_contract(tmp_path: Path, module: str, upward: str):
    shutil.copytree(ROOT / "src" / "imgvec", tmp_path / "imgvec", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "imgvec" / module, "a") as fh:
        fh.write(f"\n{upward}  # noqa\n")
    out = _lint(tmp_path)
    assert out.returncode == 1 and "0 broken" not in out.stdout, out.stdout[-3000:]
    assert "imgvec." + module[:-3].replace("/", ".") in out.stdout
