"""How the CLI shows the library's progress (:mod:`imgvec.progress`) on stderr.

On a terminal: a rich bar per phase, left in place when it ends with the time it took. Anywhere
else (a log file, a pipe, a CI job): a line when a phase has run for :data:`QUIET_SECONDS` and
one when it ends, with its time, so a long ``compare`` or ``train`` is never silent, while a
quick command (or an error in the first second) stays one line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Any

QUIET_SECONDS = 2.0  # without a terminal, phases shorter than this print nothing


class Reporter:
    """A ``progress(done, total, phase=...)`` callback that renders on ``stream`` (default stderr).

    ``terminal`` forces the bar (True) or the lines (False); by default the bar is drawn only
    when ``stream`` is a terminal. Use it as a context manager, so a bar is closed on errors too.

    By default it writes to a duplicate of stderr's file descriptor: while TensorFlow is imported,
    file descriptor 2 itself is sent elsewhere to keep native start-up chatter off the screen
    (:mod:`imgvec.backbones.device`), and a model's loading would otherwise lose its "started" line.
    """

    def __init__(self, stream: IO[str] | None = None, terminal: bool | None = None) -> None:
        self._own: IO[str] | None = None if stream is not None else _duplicate(sys.stderr)
        self.stream = stream if stream is not None else (self._own or sys.stderr)
        self.terminal = terminal
        self._bar: Any = None  # rich.progress.Progress, started on the first phase
        self._tasks: dict[str, Any] = {}
        self._started: dict[str, float] = {}
        self._announced: set[str] = set()
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._own is not None:
            with self._lock:
                self._own.close()

    def __call__(self, done: int, total: int, phase: str = "working") -> None:
        if self._use_bar():
            self._draw(done, total, phase)
            return
        if phase not in self._started:
            self._started[phase] = time.perf_counter()
            if QUIET_SECONDS <= 0:
                self._announce(phase, total)
            else:
                timer = self._timers[phase] = threading.Timer(QUIET_SECONDS, self._announce, (phase, total))
                timer.daemon = True
                timer.start()
        if done >= total and phase in self._started:
            seconds = time.perf_counter() - self._started.pop(phase)
            timer = self._timers.pop(phase, None)
            if timer is not None:
                timer.cancel()
            with self._lock:
                if phase in self._announced:
                    self._announced.discard(phase)
                    self._line(f"imgvec: progress: {phase}: {done:,}/{total:,} in {seconds:.1f}s")

    def _announce(self, phase: str, total: int) -> None:
        with self._lock:
            if phase in self._started and phase not in self._announced:
                self._announced.add(phase)
                self._line(f"imgvec: progress: {phase}: started ({total:,})")

    def _use_bar(self) -> bool:
        if self.terminal is None:
            isatty = getattr(self.stream, "isatty", None)
            self.terminal = bool(isatty and isatty())
        return self.terminal

    def _line(self, text: str) -> None:
        if not self.stream.closed:  # a timer firing as the command ends
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


def _duplicate(stream: IO[str]) -> IO[str] | None:
    """A line-buffered text stream on a duplicate of ``stream``'s file descriptor (None where it has none)."""
    try:
        stream.flush()
        fd = os.dup(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a test runner's stream, or a closed stderr
        return None
    return os.fdopen(fd, "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="backslashreplace")
