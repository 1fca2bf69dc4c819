"""`make demo` (python -m imgvec.cli.demo): the whole job through the public API, offline, on random weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_the_demo_runs_every_step_and_says_its_weights_are_random(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "imgvec.cli.demo", str(tmp_path / "demo-out")], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "falling back to RANDOM weights" in text and "--weights none" in text  # offline: no ImageNet file
    steps = [int(m) for m in re.findall(r"^(\d)\. ", text, re.M)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "embedded 48 images" in text and "built a flat FAISS index over 48 rows" in text
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+) on 16 images", text).group(1))
    assert accuracy >= 0.75  # colour classes stay separable even with random weights
    assert "8 of the 16 held-out images (every other one):" in text  # a shortened table says so
    assert "chance: 0.250 always guessing the most common class" in text
    assert (tmp_path / "demo-out" / "head.h5").is_file() and (tmp_path / "demo-out" / "demo.h5").is_file()
