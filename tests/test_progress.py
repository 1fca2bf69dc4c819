"""Progress: every long phase is told to the callback by name (library), and shown by the CLI
(a bar on a terminal; start and end lines with times elsewhere)."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import imgvec
import imgvec.api
from imgvec.cli import app
from imgvec.progress import Phase, steps, takes_phase
from imgvec.cli.reporter import Reporter

SMALL_ARGS = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64"]


class Recorder:
    """A phase-aware callback: every (phase, done, total) it hears, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, done: int, total: int, phase: str = "") -> None:
        self.calls.append((phase, done, total))

    def phases(self) -> list[str]:
        return list(dict.fromkeys(p for p, _, _ in self.calls))

    def of(self, phase: str) -> list[tuple[int, int]]:
        return [(d, t) for p, d, t in self.calls if p == phase]


def test_each_phase_starts_at_zero_and_ends_at_its_total():
    heard = Recorder()
    with Phase(heard, "counting", 3) as step:
        step.advance()
        step.advance(2)
    with Phase(heard, "skipped early", 4):  # a clean exit ends the phase even without updates
        pass
    with pytest.raises(RuntimeError), Phase(heard, "failing", 5) as step:
        step.advance()
        raise RuntimeError("stop")
    with Phase(heard, "nothing to do", 0):
        pass
    assert heard.of("counting") == [(0, 3), (1, 3), (3, 3)]
    assert heard.of("skipped early") == [(0, 4), (4, 4)]
    assert heard.of("failing") == [(0, 5), (1, 5)]  # an error is not reported as the end
    assert heard.of("nothing to do") == []


def test_steps_counts_a_step_when_its_loop_body_is_done():
    heard = Recorder()
    seen = []
    for item in steps(heard, "folds", "abc"):
        seen.append((item, heard.calls[-1][1]))  # inside the body: the steps before it are done
    assert seen == [("a", 0), ("b", 1), ("c", 2)] and heard.of("folds")[-1] == (3, 3)
    heard = Recorder()
    with pytest.raises(ValueError):
        for item in steps(heard, "folds", "ab"):
            raise ValueError(item)
    assert heard.of("folds") == [(0, 2)]


def test_old_two_argument_callbacks_still_get_the_counts():
    counts: list[tuple[int, int]] = []
    assert not takes_phase(lambda done, total: None) and takes_phase(Recorder())
    assert takes_phase(lambda done, total, **kw: None)
    with Phase(lambda done, total: counts.append((done, total)), "embedding", 2) as step:
        step.update(2)
    assert counts == [(0, 2), (2, 2)]


def test_train_reports_the_C_search_by_fold_and_the_final_fit(store_path: Path, tmp_path: Path):
    heard = Recorder()
    imgvec.train(store_path, tmp_path / "head.h5", cv=3, progress=heard)
    assert heard.phases() == ["choosing C", "final fit"]
    assert heard.of("choosing C") == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert heard.of("final fit") == [(0, 1), (1, 1)]


def test_embed_index_merge_dedup_report_their_phases(image_dir: Path, small: dict, tmp_path: Path):
    heard = Recorder()
    store = tmp_path / "a.h5"
    imgvec.embed([image_dir / "reds", image_dir / "blues"], store, progress=heard, **small)
    assert heard.phases() == ["loading mobilenetv3small", "embedding with mobilenetv3small"]
    embedding = heard.of("embedding with mobilenetv3small")
    assert embedding[0] == (0, 12) and embedding[-1] == (12, 12)
    assert [d for d, _ in embedding] == sorted(d for d, _ in embedding)

    heard = Recorder()
    imgvec.build_index(store, progress=heard)
    assert heard.of("building the flat index") == [(0, 12), (12, 12)]

    other = tmp_path / "b.h5"
    imgvec.embed([image_dir / "greens"], other, **small)
    heard = Recorder()
    imgvec.api.merge([store, other], tmp_path / "all.h5", progress=heard)
    assert heard.phases() == ["merging"] and heard.of("merging")[-1] == (18, 18)

    heard = Recorder()
    imgvec.dedup(store, progress=heard)
    assert heard.phases() == ["reading the store", "hashing files", "searching pairs"]
    assert heard.of("hashing files") == [(0, 12), (12, 12)]


def test_query_predict_evaluate_report_embedding_their_inputs(store_path: Path, holdout_dir: Path, tmp_path: Path):
    head = imgvec.train(store_path, tmp_path / "head.h5", cv=3).head
    for call in (lambda p: imgvec.query(store_path, [holdout_dir], k=2, progress=p),
                 lambda p: imgvec.predict(head, [holdout_dir], progress=p),
                 lambda p: imgvec.evaluate(head, holdout_dir, progress=p)):
        heard = Recorder()
        call(heard)
        assert heard.of("embedding with mobilenetv3small")[0] == (0, 12)
        assert heard.of("embedding with mobilenetv3small")[-1] == (12, 12)


def test_compare_reports_each_backbone_and_each_fold(image_dir: Path, tmp_path: Path):
    heard = Recorder()
    imgvec.compare(image_dir, ["mobilenetv3small"], cv=2, stores=tmp_path / "cmp", weights="none", image_size=64,
                   speed_sample=4, progress=heard)
    assert heard.phases() == ["loading mobilenetv3small", "embedding with mobilenetv3small",
                              "cross-validating mobilenetv3small", "timing mobilenetv3small"]
    assert heard.of("cross-validating mobilenetv3small") == [(0, 2), (1, 2), (2, 2)]


def test_cli_without_a_terminal_prints_when_each_phase_starts_and_ends(image_dir: Path, tmp_path: Path, monkeypatch):
    """stderr is not a terminal under CliRunner: one line at the start, one at the end with the time."""
    monkeypatch.setattr("imgvec.cli.reporter.QUIET_SECONDS", 0)  # these small phases take less than the usual 2 s
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    runner = CliRunner()
    r = runner.invoke(app, ["embed", str(folder), "-o", str(tmp_path / "s.h5"), *SMALL_ARGS])
    assert r.exit_code == 0, r.stderr
    assert "imgvec: progress: embedding with mobilenetv3small: started (24)\n" in r.stderr
    assert re.search(r"^imgvec: progress: embedding with mobilenetv3small: 24/24 in \d+\.\ds$", r.stderr, re.M)
    r = runner.invoke(app, ["train", str(tmp_path / "s.h5"), "-o", str(tmp_path / "h.h5"), "--cv", "3"])
    assert r.exit_code == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("imgvec: progress: choosing C")]
    assert lines[0] == "imgvec: progress: choosing C: started (3)"
    assert re.fullmatch(r"imgvec: progress: choosing C: 3/3 in \d+\.\ds", lines[1])
    assert "imgvec: progress:" not in r.stdout  # results on stdout stay clean
    r = runner.invoke(app, ["index", str(tmp_path / "s.h5")])
    assert re.search(r"^imgvec: progress: building the flat index: 24/24 in \d+\.\ds$", r.stderr, re.M)


def test_without_a_terminal_a_short_phase_is_quiet_and_a_long_one_is_announced_while_it_runs(monkeypatch):
    """The quiet window is a timer per phase: one that ends first is cancelled (no line), one that fires announces
    the phase mid-run. The timers are fakes fired by hand, so nothing here depends on the machine's speed."""
    import imgvec.cli.reporter as reporter

    timers = []

    class Timer:
        def __init__(self, seconds, fn, args):
            self.seconds, self.fn, self.args, self.cancelled, self.daemon = seconds, fn, args, False, False
            timers.append(self)

        def start(self):
            pass

        def cancel(self):
            self.cancelled = True

        def fire(self):
            if not self.cancelled:
                self.fn(*self.args)

    monkeypatch.setattr(reporter.threading, "Timer", Timer)
    out = io.StringIO()
    with Reporter(out, terminal=False) as progress:
        with Phase(progress, "quick", 2):
            pass
        (quick,) = timers
        assert quick.seconds == reporter.QUIET_SECONDS and quick.cancelled
        quick.fire()  # a timer that fires after its phase ended says nothing
        assert out.getvalue() == ""
        with Phase(progress, "slow", 2) as step:
            step.update(1)
            assert out.getvalue() == ""  # inside the window: nothing yet
            timers[-1].fire()  # the window passes mid-phase
            assert out.getvalue() == "imgvec: progress: slow: started (2)\n"
    assert re.fullmatch(r"imgvec: progress: slow: started \(2\)\nimgvec: progress: slow: 2/2 in \d+\.\ds\n",
                        out.getvalue())


def test_on_a_terminal_each_phase_is_a_bar_that_stays_with_its_time():
    out = io.StringIO()
    with Reporter(out, terminal=True) as progress:
        with Phase(progress, "choosing C", 5) as step:
            step.update(3)
    text = out.getvalue()
    assert "choosing C" in text and "5/5" in text and "━" in text  # rich's bar, finished
    assert "imgvec: progress:" not in text  # no log lines on a terminal


MUTED_LOAD = """
from imgvec.backbones.device import _native_stderr_muted
from imgvec.cli import reporter

reporter.QUIET_SECONDS = 0  # announce at once: no timing in the test
with reporter.Reporter(terminal=False) as progress:
    with _native_stderr_muted():  # as while TensorFlow is imported during a model's loading
        progress(0, 1, phase="loading mobilenetv3small")
    progress(1, 1, phase="loading mobilenetv3small")
"""


def test_a_phase_announced_while_native_stderr_is_muted_still_prints_its_start_line():
    """Loading a model imports TensorFlow with file descriptor 2 sent to a temporary file; the CLI's
    "started" line, printed meanwhile by the reporter's timer, must reach the log all the same."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", MUTED_LOAD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["imgvec: progress: loading mobilenetv3small: started (1)",
                                     r.stderr.splitlines()[1]]
    assert re.fullmatch(r"imgvec: progress: loading mobilenetv3small: 1/1 in \d+\.\ds", r.stderr.splitlines()[1])
