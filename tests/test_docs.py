"""The front page and docs/: generated tables are fresh, the README is a front page, and every
command it shows runs (the quick start end to end on small inputs; every other line parses)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
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


def test_the_design_doc_is_the_import_contracts(monkeypatch):
    """docs/design.md's layers are pyproject.toml's contracts: every module of a layered package is in its row,
    in the contract's order, and a contract that changes makes the section stale."""
    import re

    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| \d+ \| `([a-z_]+)/` \|.*\| (.*) \|$", docs.layers(),
                                                          re.M)}
    for package in ("files", "vectors", "runtime", "backbones", "embedding", "cli"):
        modules = {p.stem for p in (ROOT / "src/imgvec" / package).glob("*.py")} - {"__init__"}
        assert set(re.findall(r"`([a-z_0-9]+)`", rows[package])) == modules, package
    assert rows["files"].index("`artifact`") < rows["files"].index("`header`") < rows["files"].index("`structure`")
    text = (ROOT / "pyproject.toml").read_text().replace('"artifact", "header", "strings"', '"header", "artifact", "strings"')
    monkeypatch.setattr(docs, "REPO", ROOT)
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self.name == "pyproject.toml"
                        else real(self, *a, **k))
    assert "docs/design.md: layers" in docs.stale()


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
    """One format for both: `imgvec models`' table cells are docs/backbones.md's (36.0 images/s, not 36.0000)."""
    from typer.testing import CliRunner

    table = CliRunner().invoke(app, ["models"]).stdout
    printed = {cells[0]: cells for cells in ([c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines()
                                             if line.startswith("│"))}
    documented = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in
                                                (ROOT / "docs/backbones.md").read_text().splitlines())
                  if cells and cells[0] in printed}
    from imgvec.backbones.registry import BACKBONES

    assert len(documented) == len(printed) == len(BACKBONES) == 41
    for name, cells in printed.items():
        # models: name input dim params top1 top5 size_mb depth images/s; docs: name class input dim params pre ...
        docs_cells = documented[name]
        assert cells[1:4] == docs_cells[2:5] and cells[4:9] == docs_cells[6:11], name
    speed = BACKBONES["resnet50"].images_per_second
    assert f"{speed:.1f}" in printed["resnet50"] and not any(re.search(r"\.\d{4}$", c) for r in printed.values() for c in r)


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


def _clone(work: Path) -> Path:
    """What `make demo` leaves behind (smaller) in a repository with this one's .gitignore, and `.venv`
    pointing at this interpreter's environment."""
    from imgvec.synthetic import make_photo_folder

    classes = ("cat", "coffee", "rocket", "flower")
    make_photo_folder(work / "demo-out/images/train", per_class=6, size=64, classes=classes, seed=0)
    make_photo_folder(work / "demo-out/images/holdout", per_class=2, size=64, classes=classes, seed=1)
    (work / ".venv").symlink_to(sys.prefix)
    shutil.copy(ROOT / ".gitignore", work / ".gitignore")
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    return work


@pytest.fixture(scope="module")
def quick_start_folder(tmp_path_factory) -> Path:
    return _clone(tmp_path_factory.mktemp("clone"))


def _untracked(work: Path) -> list[str]:
    """What `git status` would show a contributor who ran the README there: files .gitignore does not name."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=work, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line != "?? .gitignore"]


def _run_quick_start(work: Path, small: bool) -> subprocess.CompletedProcess[str]:
    lines = []
    for line in _quick_start().splitlines():
        if small and line.startswith("imgvec embed "):
            line = line.split("#")[0].rstrip() + " " + " ".join(SMALL_EMBED)
        lines.append(line)
    script = "set -e\n" + "\n".join(lines) + "\n"
    env = dict(os.environ, PATH=os.defpath)  # imgvec is on PATH only through the activate line
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "photos.index.h5").exists() and (work / "head.h5").exists()
    page = (work / "gallery.html").read_text()
    assert ("RANDOM WEIGHTS" in page) == small and "<img" in page  # as printed: pretrained efficientnetlite0
    assert "accuracy" in r.stdout and "command not found" not in r.stderr
    return r


def test_the_quick_start_runs_as_written(quick_start_folder: Path):
    """Each line of the quick start in a shell, the .venv activated as the README says; only the
    embedding is made small (mobilenetv3small, 64 px). It leaves nothing .gitignore does not name (no lock file)."""
    _run_quick_start(quick_start_folder, small=True)
    assert _untracked(quick_start_folder) == []


@pytest.mark.slow
def test_the_quick_start_runs_verbatim_offline(tmp_path: Path):
    """The quick start exactly as printed (efficientnetb0 at 224 px), with the network blocked (conftest)."""
    r = _run_quick_start(_clone(tmp_path), small=False)
    assert "efficientnetb0" in r.stdout and "Downloading data from" not in r.stderr
    assert _untracked(tmp_path) == []


@pytest.mark.slow
def test_the_python_example_runs_verbatim_offline(tmp_path: Path):
    """The README's Python block as printed, in a fresh process in a folder like the demo's, network blocked."""
    work = _clone(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", _blocks("python")[0]], cwd=work, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "macro avg" not in r.stdout and "precision" in r.stdout  # print(trained.cv_accuracy, report["macro avg"])
    assert (work / "gallery.html").exists() and (work / "imgvec-compare" / "efficientnetb0.h5").exists()
    assert _untracked(work) == []


# -- what the docs say the tool does, run ---------------------------------------------------------
def _doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def _inline_commands() -> list[tuple[str, list[str]]]:
    """Every `imgvec COMMAND ...` in backticks outside code blocks, in README.md and docs/: (page, words)."""
    found = []
    for path in [ROOT / "README.md", *docs.doc_files()]:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for cmd in re.findall(r"`(imgvec [a-z][^`]*)`", text):
            found.append((path.name, shlex.split(cmd)[1:]))
    return found


def test_every_option_the_docs_name_for_a_command_is_one_it_takes():
    """`imgvec index --kind ivfpq`, `imgvec embed --device auto|cpu|gpu`, ... in prose: each option exists."""
    group = typer.main.get_command(app)
    commands = [(page, words) for page, words in _inline_commands() if words[0] in group.commands]
    assert len(commands) > 50
    for page, words in commands:
        options = {o for p in group.commands[words[0]].params for o in p.opts + p.secondary_opts}
        for word in words[1:]:
            if word.startswith("-"):
                assert word.split("=")[0] in options, (page, words)


def test_every_exit_status_the_cli_docs_list_is_what_the_tool_exits_with(tmp_path: Path, image_dir: Path,
                                                                         store_path: Path):
    """docs/cli.md: "exit status 2 for bad input, 3 for files made differently used together, 4 for missing
    weights": one command of each kind, run (the network is blocked here, so 4 is a Keras backbone's ImageNet
    weights; the default backbone's ship with imgvec)."""
    from typer.testing import CliRunner

    wording = "exit status (2) for bad input, (3) for files made differently used together, (4) for missing weights"
    sentence = re.search(wording.replace(" ", r"\s+"), _doc("cli.md"))
    assert sentence, "docs/cli.md no longer lists the exit statuses this test runs"
    other = tmp_path / "other.h5"
    CliRunner().invoke(app, ["embed", str(image_dir), "-o", str(other), "-m", "mobilenetv2", "--weights", "none",
                             "--image-size", "64"])
    cases = {
        2: ["query", str(store_path), str(image_dir), "-k", "0"],
        3: ["embed", str(image_dir), "-o", str(other), *SMALL_EMBED],
        4: ["embed", str(image_dir), "-o", str(tmp_path / "new.h5"), "-m", "mobilenetv2"],
    }
    for code, args in cases.items():
        assert str(code) in sentence.groups()
        r = CliRunner().invoke(app, args)
        assert r.exit_code == code, (args, r.stderr)
        assert r.stderr.startswith("imgvec: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "new.h5").exists()


def _doc_row(page: str, starts: str) -> str:
    [row] = [line for line in _doc(page).splitlines() if line.startswith(f"| {starts}")]
    return row


def _quoted(row: str) -> list[re.Pattern[str]]:
    """The `...` quotes of a few words in a table row's last cell, as patterns ("..." and photos.h5 stand for anything)."""
    cell = row.rstrip(" |").rsplit("|", 1)[1]
    return [re.compile(re.escape(q).replace(re.escape("..."), ".*").replace(re.escape("photos.h5"), r"\S+"))
            for q in re.findall(r"`([^`]+)`", cell) if " " in q]  # words said, not a command's bare name


def test_the_reliability_table_says_what_query_does_with_an_index_that_is_behind(tmp_path: Path, image_dir: Path):
    """docs/reliability.md's rows on indexes from another store, from before --sync, and missing new rows,
    each checked against a real query: exit status, the quoted words, the header."""
    import shutil

    from typer.testing import CliRunner

    def run(*args: str) -> "object":
        return CliRunner().invoke(app, [str(a) for a in args])

    photos = tmp_path / "photos"
    shutil.copytree(image_dir, photos)
    store, other = tmp_path / "photos.h5", tmp_path / "other.h5"
    run("embed", photos, "-o", store, *SMALL_EMBED)
    run("embed", photos, "-o", other, *SMALL_EMBED)
    run("index", store)
    query = photos / "reds" / "reds_000.png"

    # rows embedded after the index was built: searched beside it, exit 0, a note
    row = _doc_row("reliability.md", "rows embedded after the index was built")
    assert "exit 0" in row
    extra = tmp_path / "extra" / "reds"
    extra.mkdir(parents=True)
    shutil.copy(query, extra / "new.png")
    shutil.copytree(photos, tmp_path / "extra", dirs_exist_ok=True)
    shutil.rmtree(photos)
    (tmp_path / "extra").rename(photos)
    run("embed", photos, "-o", store)
    r = run("query", store, query, "-k", "3")
    assert r.exit_code == 0 and "not indexed yet" in r.stderr and f"imgvec index {store}" in r.stderr, r.stderr

    # an index from another store: exit 3, "rebuild it (imgvec index ...)"
    row = _doc_row("reliability.md", "an index from another store")
    assert "exit 3" in row
    r = run("query", other, query, "--index", tmp_path / "photos.index.h5")
    assert r.exit_code == 3 and all(p.search(r.stderr) for p in _quoted(row)), r.stderr

    # an index from before --sync removed rows: not used, every row searched, the header and a note say so
    row = _doc_row("reliability.md", "an index from before `embed --sync` removed rows")
    assert "exit 0" in row
    (photos / "reds" / "new.png").unlink()
    run("embed", photos, "-o", store, "--sync")
    r = run("query", store, query, "-k", "3")
    assert r.exit_code == 0 and all(p.search(r.stdout + r.stderr) for p in _quoted(row)), r.stdout + r.stderr
    assert "no index file" not in r.stdout and f"imgvec index {store}" in r.stderr


def test_the_format_version_the_docs_give_is_the_one_written(store_path: Path):
    import h5py

    import imgvec
    from imgvec.files.header import FORMAT_VERSION

    files = _doc("files.md")
    assert f"`store` / `index` / `head`, `imgvec-<kind>`, `{FORMAT_VERSION}`" in files
    written = re.search(r"imgvec (\d+\.\d+\.\d+) writes format (\d+)", files)
    assert written and written.groups() == (imgvec.__version__, str(FORMAT_VERSION))
    with h5py.File(store_path, "r") as h5:
        assert int(h5.attrs["format_version"]) == FORMAT_VERSION


def test_what_the_cli_docs_say_serve_answers_with_is_what_it_sends():
    """docs/cli.md's serve paragraph names headers and fields: each is one the service sends."""
    source = "".join(p.read_text() for p in (ROOT / "src/imgvec/service").glob("*.py"))
    paragraph = _doc("cli.md").split("* **`serve`**", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"`(X-Imgvec-[A-Za-z-]+|\"[a-z_]+\")`", paragraph)
    assert len(names) >= 3
    for name in names:
        assert name in source, name
    assert "/api/info" in paragraph and "[docs/cli.md](docs/cli.md#what-the-commands-do)" in README
    assert "## What the commands do" in _doc("cli.md")


def test_every_page_of_docs_is_linked_from_the_readme():
    for path in docs.doc_files():
        if path.parent.name == "docs":
            assert f"](docs/{path.name})" in README, path.name
