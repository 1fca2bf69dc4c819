"""`make demo` (python -m imgvec.cli.demo): the whole job through the public API, offline, on pretrained weights
(efficientnetlite0's, installed with imgvec) and real packaged photos."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_the_demo_runs_every_step_offline_with_pretrained_neighbours(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "imgvec.cli.demo", str(tmp_path / "demo-out")], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "RANDOM" not in text and "NOTE" not in text  # offline (conftest), yet no fallback
    assert "efficientnetlite0 @ 224px, pretrained ImageNet weights from efficientnet-lite0-57934424.pth" in text
    steps = [int(m) for m in re.findall(r"^(\d)\. ", text, re.M)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "augmented copies of packaged photos" in text
    assert "embedded 96 images" in text and "built a flat FAISS index over 96 rows" in text
    same = re.search(r"of the 36 held-out images: (\d+) of their 180 top-5 neighbours are of the query's class", text)
    assert same and int(same.group(1)) >= 0.9 * 180
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+) on 36 images", text).group(1))
    assert accuracy >= 0.9
    assert "18 of the 36 held-out images (every other one):" in text  # a shortened table says so
    assert "chance: 0.083 always guessing the most common class" in text
    assert (tmp_path / "demo-out" / "head.h5").is_file() and (tmp_path / "demo-out" / "demo.h5").is_file()
