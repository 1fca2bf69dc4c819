"""Without a network, commands that need ImageNet weights Keras has not cached say so at once (one line,
exit 4, no "Downloading data from"), before TensorFlow is imported; with the weights in Keras' cache
nothing is asked. conftest.py blocks the network (HTTP(S) through a closed local port, empty KERAS_HOME)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from imgvec.backbones import weights as w
from imgvec.backbones.registry import BACKBONES, Weights, get_backbone
from imgvec.errors import MissingWeightsError

# Runs the CLI in a fresh process, then says whether TensorFlow, Keras or OpenVINO were imported on the way.
CLI = """
import sys
from imgvec.cli.commands import app
code = app(sys.argv[1:], prog_name="imgvec", standalone_mode=False)
print("imported:", any(m in sys.modules for m in ("tensorflow", "keras", "openvino")))
sys.exit(code)
"""


def _cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.fixture(autouse=True)
def _fresh_probe():
    w._unreachable.cache_clear()
    yield
    w._unreachable.cache_clear()


def test_embed_with_imagenet_weights_offline_is_one_line_at_once(tmp_path: Path, image_dir: Path):
    """A Keras backbone's ImageNet weights (the default efficientnetlite0's ship with imgvec)."""
    r = _cli("embed", str(image_dir), "-o", "photos.h5", "-m", "efficientnetb0", cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgvec: error: ImageNet weights for efficientnetb0 are not in "
                                                   "Keras' cache and there is no network"), r.stderr
    assert "Downloading data from" not in r.stderr + r.stdout
    assert "efficientnetb0_notop.h5" in lines[0] and "--weights none" in lines[0]
    assert "imported: False" in r.stdout  # said before TensorFlow loads: no model was built to find out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no lock file


def test_bare_compare_offline_names_every_missing_file_and_what_compare_takes(tmp_path: Path, image_dir: Path):
    r = _cli("compare", str(image_dir), cwd=tmp_path)
    assert r.returncode == 4 and "imported: False" in r.stdout, r.stderr
    [line] = r.stderr.splitlines()
    assert "Downloading data from" not in r.stderr
    for name in ("vgg16", "inceptionv3", "resnet50", "efficientnetb0"):
        file = w.imagenet_weights_file(get_backbone(name))
        assert file is not None and file[0] in line
    assert "--weights none" in line and "--models" in line and "--weights PATH" not in line
    assert not (tmp_path / "imgvec-compare").exists()  # nothing made before the refusal


def test_compare_takes_the_weights_its_help_names(tmp_path: Path, image_dir: Path):
    """`compare --help` and compare agree: imagenet, none, or a weights file for one backbone."""
    from typer.testing import CliRunner

    from imgvec.cli import app

    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["compare", "--help"]).stdout.split())
    assert "imagenet, none (random, seed --seed), or a weights file when --models names one backbone" in help_text
    file = tmp_path / "w.weights.h5"
    file.write_bytes(b"not really")
    r = runner.invoke(app, ["compare", str(image_dir), "-m", "mobilenetv2,mobilenetv3small", "--weights", str(file),
                            "--stores", str(tmp_path / "stores")])
    assert r.exit_code == 2 and "a weights file fits one backbone" in r.stderr, r.stderr
    assert not (tmp_path / "stores").exists()


def test_the_network_is_asked_once_per_process_and_never_when_told(monkeypatch):
    calls = []

    def refuse(address, timeout=None):
        calls.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    url = w.imagenet_weights_file(BACKBONES["efficientnetb0"])[1]
    assert "Connection refused" in w.no_network(url)
    assert "Connection refused" in w.no_network(url)
    assert calls == [(("127.0.0.1", 9), w.PROBE_SECONDS)]  # the HTTPS proxy conftest sets, asked once
    monkeypatch.setenv("IMGVEC_OFFLINE", "1")
    assert w.no_network(url) == "IMGVEC_OFFLINE=1 is set"
    monkeypatch.setenv("IMGVEC_OFFLINE", "0")
    assert w.no_network(url) is None
    assert len(calls) == 1
    monkeypatch.delenv("IMGVEC_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    w.no_network(url)
    assert calls[-1] == (("storage.googleapis.com", 443), w.PROBE_SECONDS)  # no proxy: the weights' host


def test_weights_in_keras_cache_need_no_network(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("the network was asked"))
    b = BACKBONES["mobilenetv2"]
    assert not w.weights_at_hand(b, 96)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / w.imagenet_weights_file(b, 96)[0]).write_bytes(b"")
    assert w.weights_at_hand(b, 96) and not w.weights_at_hand(b, 128)  # Keras has a file per input size
    w.check_weights_at_hand(b, Weights("imagenet"), 96)  # no error, no probe
    w.check_weights_at_hand(b, Weights("random", seed=0), 128)  # random weights need nothing
    monkeypatch.setenv("IMGVEC_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="IMGVEC_OFFLINE=1 is set"):
        w.check_weights_at_hand(b, Weights("imagenet"), 128)


def _asked_for(backbone: str, size: int) -> tuple[str, str]:
    """The (file name, URL) Keras' own constructor asks ``get_file`` for when building ``backbone``."""
    from keras.src.utils import file_utils

    from imgvec.backbones.builder import build_model

    asked = []

    def get_file(fname=None, origin=None, **kwargs):
        asked.append((fname, origin))
        raise OSError("recorded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(file_utils, "get_file", get_file)
        mp.setenv("IMGVEC_OFFLINE", "0")  # let the build reach Keras' download
        with pytest.raises(MissingWeightsError):
            build_model(get_backbone(backbone), Weights("imagenet"), size)
    return asked[0]


@pytest.mark.parametrize("backbone, size", [("mobilenetv3small", 64), ("mobilenetv2", 96), ("mobilenetv2", 64),
                                            ("efficientnetb0", 64)])
def test_the_weights_file_named_is_the_one_keras_asks_for(backbone: str, size: int):
    assert w.imagenet_weights_file(get_backbone(backbone), size) == _asked_for(backbone, size)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_the_weights_file_named_is_the_one_keras_asks_for_every_backbone(backbone: str):
    b = get_backbone(backbone)
    size = b.input_size if b.module == "nasnet" else max(b.min_size, 96)
    assert w.imagenet_weights_file(b, size) == _asked_for(backbone, size)


def test_the_offline_error_docs_backbones_shows_is_the_one_printed(tmp_path: Path, image_dir: Path):
    import re

    text = (Path(__file__).resolve().parents[1] / "docs/backbones.md").read_text()
    shown = re.search(r"`(imgvec: error: ImageNet weights for efficientnetb0 are not in [^`]+)`", text).group(1)
    r = _cli("embed", str(image_dir), "-o", "photos.h5", "-m", "efficientnetb0", cwd=tmp_path)

    def general(message: str) -> str:  # the reason and the cache folder are the machine's own
        return re.sub(r" in \S+/models/ ", " in DIR/models/ ", re.sub(r"\(no connection to [^)]*\)", "(REASON)", message))

    assert r.returncode == 4 and general(r.stderr.strip()) == general(shown), r.stderr
