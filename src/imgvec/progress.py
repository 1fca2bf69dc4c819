"""Progress of long phases, told to one optional callback; the library itself never prints.

A callback is ``progress(done, total)``, as it always was. One that also accepts a ``phase``
keyword is told which phase the counts belong to (``"embedding"``, ``"choosing C"``,
``"building the flat index"``, ...): each phase is reported first with ``done=0`` and last with
``done=total``, so a caller can show when it starts and ends. A two-argument callback gets the
same counts without the name. The CLI renders them (:mod:`imgvec.cli.reporter`); a notebook can
pass any function.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

Progress = Callable[..., None]  # progress(done, total[, phase=...])


def takes_phase(progress: Progress) -> bool:
    """Whether ``progress`` accepts the ``phase`` keyword (else it is called with the counts alone)."""
    try:
        parameters = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the old two-argument form
        return False
    return any(p.name == "phase" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class Phase:
    """One phase of ``total`` steps told to ``progress``: 0 on entry, each :meth:`update`, ``total`` on a clean exit.

    ``with Phase(progress, "embedding", len(files)) as step: ... step.update(done)``; a ``None``
    progress, or a phase with nothing to do (``total`` 0), makes every call a no-op, so library
    code needs no ``if progress``.
    """

    def __init__(self, progress: Progress | None, name: str, total: int) -> None:
        self.progress, self.name, self.total, self.done = progress, name, int(total), 0
        self._named = progress is not None and takes_phase(progress)

    def update(self, done: int) -> None:
        self.done = int(done)
        if self.progress is None or self.total <= 0:
            return
        if self._named:
            self.progress(self.done, self.total, phase=self.name)
        else:
            self.progress(self.done, self.total)

    def advance(self, steps: int = 1) -> None:
        self.update(self.done + steps)

    def __enter__(self) -> "Phase":
        self.update(0)
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None and self.done != self.total:
            self.update(self.total)


def steps(progress: Progress | None, name: str, items: Iterable[T]) -> Iterator[T]:
    """``items`` one by one, as the steps of phase ``name``: a step is done when the loop body for it is."""
    items = list(items)
    with Phase(progress, name, len(items)) as phase:
        for item in items:
            yield item
            phase.advance()
