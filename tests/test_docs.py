"""The front page and docs/: generated tables are fresh, the README is a front page, and every
command it shows runs (the quick start end to end on small inputs; every other line parses)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from benchmarks import docs
from imgvec.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SMALL_EMBED = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64"]


def test_every_generated_section_is_fresh():
    assert docs.stale() == [], "run `make docs`"


def test_a_stale_section_is_caught(monkeypatch):
    """The check fails when a source changes and the docs do not (here: a registry figure)."""
    import imgvec.backbones.registry as registry

    b = registry.BACKBONES["mobilenetv2"]
    monkeypatch.setitem(registry.BACKBONES, "mobilenetv2", type(b)(**{**vars(b), "images_per_second": 1.5}))
    assert "docs/backbones.md: backbones" in docs.stale()


def test_every_table_of_figures_is_generated():
    """A table row with a decimal figure outside a generated section is a hand-copied number."""
    for path in docs.doc_files():
        text = docs.MARKER.sub("", path.read_text())
        rows = [line for line in text.splitlines() if line.startswith("|") and re.search(r"\d\.\d", line)]
        assert rows == [], f"{path.name}: hand-written figures {rows[:2]}"


def test_models_and_the_docs_quote_the_same_speed():
    from typer.testing import CliRunner
    import json

    listed = json.loads(CliRunner().invoke(app, ["models", "-f", "json"]).stdout)
    table = (ROOT / "docs/backbones.md").read_text()
    for m in listed:
        if m["images_per_second"] is not None:
            assert re.search(rf"^\| {m['name']} \|.*\| {m['images_per_second']} \|$", table, re.M), m["name"]


def test_models_prints_its_figures_as_the_docs_print_them():
    """One format for both: `imgvec models`' table cells are docs/backbones.md's (29.2 images/s, not 29.2000)."""
    from typer.testing import CliRunner

    table = CliRunner().invoke(app, ["models"]).stdout
    printed = {cells[0]: cells for cells in ([c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines()
                                             if line.startswith("│"))}
    documented = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in
                                                (ROOT / "docs/backbones.md").read_text().splitlines())
                  if cells and cells[0] in printed}
    assert len(documented) == len(printed) == 40
    for name, cells in printed.items():
        # models: name input dim params top1 top5 size_mb depth images/s; docs: name class input dim params pre ...
        docs_cells = documented[name]
        assert cells[1:4] == docs_cells[2:5] and cells[4:9] == docs_cells[6:11], name
    assert "29.2" in printed["resnet50"] and not any(re.search(r"\.\d{4}$", c) for r in printed.values() for c in r)


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250
    for heading in ("## Set up", "## Quick start", "## Python API", "## Galleries", "## Documentation"):
        assert heading in README
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).exists(), link
    for page in ("backbones", "files", "runtimes", "reliability", "gpu", "performance", "cli"):
        assert f"docs/{page}.md" in README
    for path in docs.doc_files():  # every link between the pages leads somewhere
        for link in re.findall(r"\]\(([^)#:]+\.(?:md|png))", path.read_text()):
            assert (path.parent / link).exists(), (path.name, link)
    assert "## Files from elsewhere" in (ROOT / "docs/reliability.md").read_text()
    history = re.compile(r"earlier claim|was wrong|before this,|used to be|withdrawn", re.I)
    for path in docs.doc_files():
        assert not history.search(path.read_text()), f"{path.name} speaks of history"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _quick_start() -> str:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[0]


def _imgvec_lines(block: str) -> list[list[str]]:
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["imgvec"]:
            commands.append(words[1:])
    return commands


def test_every_imgvec_command_in_the_readme_parses():
    group = typer.main.get_command(app)
    lines = [words for block in _blocks("bash") for words in _imgvec_lines(block)]
    assert len(lines) >= 8
    for words in lines:
        command = group.commands[words[0]]
        command.make_context(f"imgvec {words[0]}", list(words[1:]))  # unknown options or missing arguments raise


def test_the_python_api_block_is_valid_python_on_public_names():
    import imgvec

    code = _blocks("python")[0]
    compile(code, "README.md", "exec")
    for name in re.findall(r"imgvec\.(\w+)\(", code):
        assert hasattr(imgvec, name), name


@pytest.fixture(scope="module")
def quick_start_folder(tmp_path_factory) -> Path:
    """What `make demo` leaves behind (smaller), and `.venv` pointing at this interpreter's environment."""
    from imgvec.synthetic import make_image_folder

    work = tmp_path_factory.mktemp("clone")
    make_image_folder(work / "demo-out/images/train", per_class=6, size=64, seed=0)
    make_image_folder(work / "demo-out/images/holdout", per_class=2, size=64, seed=1)
    (work / ".venv").symlink_to(sys.prefix)
    return work


def test_the_quick_start_runs_as_written(quick_start_folder: Path):
    """Each line of the quick start in a shell, the .venv activated as the README says; only the
    embedding is made small (mobilenetv3small, random weights, 64 px: nothing can be downloaded here)."""
    lines = []
    for line in _quick_start().splitlines():
        if line.startswith("imgvec embed "):
            line = line.split("#")[0].rstrip() + " " + " ".join(SMALL_EMBED)
        lines.append(line)
    script = "set -e\n" + "\n".join(lines) + "\n"
    env = dict(os.environ, PATH=os.defpath)  # imgvec is on PATH only through the activate line
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    r = subprocess.run(["bash", "-c", script], cwd=quick_start_folder, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (quick_start_folder / "photos.index.h5").exists() and (quick_start_folder / "head.h5").exists()
    page = (quick_start_folder / "gallery.html").read_text()
    assert "RANDOM WEIGHTS" in page and "<img" in page
    assert "accuracy" in r.stdout and "command not found" not in r.stderr
