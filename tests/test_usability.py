"""What a new user meets at the command line: --version, shell completion, "did you mean",
help texts without type noise that say only what is true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main
from typer.testing import CliRunner

import imgvec
from imgvec.cli import app
from imgvec.errors import did_you_mean

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_version_is_the_package_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout == f"imgvec {imgvec.__version__}\n"
    # one source: imgvec.__version__ is pyproject.toml's version, as installed
    import tomllib

    assert imgvec.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _imgvec(*args: str, **env: str) -> str:
    """``imgvec ARGS`` in a fresh process (completion reads its environment), its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    r = subprocess.run([sys.executable, "-m", "imgvec", *args], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _complete(words: str, cword: int) -> list[str]:
    return _imgvec(_IMGVEC_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword)).split()


def test_shell_completion_offers_commands_models_and_runtimes():
    assert "_IMGVEC_COMPLETE=complete_bash" in _imgvec("--show-completion", "bash")
    assert _complete("imgvec ev", 1) == ["evaluate"]
    assert _complete("imgvec embed -m mobilenetv3s", 3) == ["mobilenetv3small"]
    assert _complete("imgvec query s.h5 q.jpg --runtime o", 5) == ["openvino"]


def test_shell_completion_offers_the_values_each_option_checks():
    """Completion and the checks share their choices: what completes is accepted, and only that."""
    assert _complete("imgvec query s.h5 q.jpg --format ", 5) == ["table", "json", "csv"]
    assert _complete("imgvec dedup s.h5 -f h", 4) == ["html"]
    assert _complete("imgvec evaluate h.h5 d -f c", 5) == []  # evaluate prints no csv
    assert _complete("imgvec index s.h5 --kind ", 4) == ["auto", "flat", "hnsw", "ivfpq"]
    assert _complete("imgvec embed d -o s.h5 --device g", 6) == ["gpu"]
    assert _complete("imgvec embed d -o s.h5 --precision m", 6) == ["mixed"]
    assert _complete("imgvec embed d -o s.h5 --engine r", 6) == ["ray"]
    assert _complete("imgvec query s.h5 q.jpg --faiss-gpu o", 5) == ["on", "off"]
    assert _complete("imgvec models --sort images", 3) == ["images_per_second"]
    assert _complete("imgvec compare d -m vgg16,mobilenetv3s", 4) == ["vgg16,mobilenetv3small"]


@pytest.mark.parametrize("args, suggestion", [
    (["compare", ".", "-m", "mobilenetv3smal"], "unknown model 'mobilenetv3smal' (did you mean mobilenetv3small?)"),
    (["compare", ".", "-m", "efficientnet-b0"], None),  # a spelling the registry accepts is no error at all
    (["query", "s.h5", "q.png", "--format", "jsn"], "'jsn' is not one of table, json, csv (did you mean json?)"),
    (["embed", "{images}", "-o", "x.h5", "--runtime", "openvno"],
     "--runtime 'openvno': expected one of auto, openvino, tensorflow, jax, torch (did you mean openvino?)"),
    (["embed", "{images}", "-o", "x.h5", "--device", "gpus"], "(did you mean gpu?)"),
])
def test_near_misses_get_a_suggestion_in_one_line(args, suggestion, image_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(*[a.format(images=image_dir) for a in args])
    if suggestion is None:
        assert "unknown model" not in r.stderr
        return
    assert r.exit_code == 2 and suggestion in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("imgvec: error:")


def test_no_suggestion_for_a_word_unlike_any_choice():
    assert did_you_mean("zzzz", ["json", "csv"]) == ""
    assert did_you_mean("RESNET5", ["resnet50", "resnet101"]) == " (did you mean resnet50?)"


def _commands() -> list[click.Command]:
    group = typer.main.get_command(app)
    return [group, *group.commands.values()]


def test_help_shows_no_type_for_flags():
    for command in _commands():
        r = invoke(*([] if command.name in (None, "imgvec") else [command.name]), "--help")
        assert r.exit_code == 0, r.stderr
        assert "<bool>" not in r.stdout and "\\[" not in r.stdout, command.name  # no type noise, no markup escapes


def test_runtime_help_says_random_weights_do_not_travel_between_backends():
    for command in _commands():
        for p in command.params:
            if "--runtime" in getattr(p, "opts", []):
                assert "every runtime gives the same embeddings" not in p.help, command.name
                assert "--weights none" in p.help and "jax and torch" in p.help, command.name
