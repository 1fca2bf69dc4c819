"""How the CLI shows the library's progress (:mod:`imgvec.progress`) on stderr.

On a terminal: a rich bar per phase, left in place when it ends with the time it took. Anywhere
else (a log file, a pipe, a CI job): one line when a phase starts and one when it ends, with its
time, so a long ``compare`` or ``train`` is never silent and a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class Reporter:
    """A ``progress(done, total, phase=...)`` callback that renders on ``stream`` (default stderr).

    ``terminal`` forces the bar (True) or the lines (False); by default the bar is drawn only
    when ``stream`` is a terminal. Use it as a context manager, so a bar is closed on errors too.
    """

    def __init__(self, stream: IO[str] | None = None, terminal: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = terminal
        self._bar: Any = None  # rich.progress.Progress, started on the first phase
        self._tasks: dict[str, Any] = {}
        self._started: dict[str, float] = {}

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __call__(self, done: int, total: int, phase: str = "working") -> None:
        if self._use_bar():
            self._draw(done, total, phase)
            return
        if phase not in self._started:
            self._started[phase] = time.perf_counter()
            self._line(f"imgvec: {phase}: 0/{total:,}")
        if done >= total and phase in self._started:
            seconds = time.perf_counter() - self._started.pop(phase)
            self._line(f"imgvec: {phase}: {done:,}/{total:,} in {seconds:.1f}s")

    def _use_bar(self) -> bool:
        if self.terminal is None:
            isatty = getattr(self.stream, "isatty", None)
            self.terminal = bool(isatty and isatty())
        return self.terminal

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _draw(self, done: int, total: int, phase: str) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            console = Console(file=self.stream, force_terminal=True)
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self._bar.start()
        task = self._tasks.get(phase)
        if task is None or (done == 0 and self._bar.tasks[task].finished):  # a phase run again starts afresh
            task = self._tasks[phase] = self._bar.add_task(phase, total=total)
        self._bar.update(task, completed=done, total=total)
