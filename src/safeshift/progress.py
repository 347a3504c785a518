"""How far a long run on a virtual clock is: a rich progress bar on a terminal, a plain line
every few seconds when the output is piped (a CI log, ``| tee``), nothing without a console.

The demo and ``safeshift simulate`` both drive a rollout through hours of virtual time in
seconds to minutes of real time; both report through :func:`virtual_time_progress`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from safeshift.rollout import Rollout

PLAIN_EVERY = 10.0
"""Seconds of real time between two plain progress lines when the output is not a terminal."""

Moved = Callable[[float], None]


def virtual_minutes(seconds: float) -> str:
    """``seconds`` of virtual time as ``12 min``."""
    return f"{seconds / 60:.0f} min"


def rollout_now(rollout: Rollout) -> str:
    """What a rollout is doing: its phase, and the stage it is in."""
    state = rollout.state()
    if 0 <= state.stage_index < len(rollout.plan.stages):
        return f"{state.phase} in stage {rollout.plan.stages[state.stage_index].name!r}"
    return str(state.phase)


@contextmanager
def virtual_time_progress(console: Console | None, total: float, describe: Callable[[], str], *,
                          every: float = PLAIN_EVERY,
                          wall: Callable[[], float] = time.perf_counter) -> Iterator[Moved]:
    """A callback ``moved(elapsed)`` to call as the virtual clock advances (``elapsed`` seconds
    out of at most ``total``). On a terminal it moves a transient bar; otherwise it prints
    ``  ... 12 min of at most 240 min of virtual time, <describe()> (8 s)`` at most once every
    ``every`` real seconds. ``describe`` says what the run is doing now (e.g. the phase)."""
    if console is None:
        yield lambda elapsed: None
        return
    if console.is_terminal:
        with Progress(TextColumn("  virtual time"), BarColumn(), TextColumn("{task.description}"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("", total=total)
            yield lambda elapsed: bar.update(
                task, completed=elapsed, description=f"{virtual_minutes(elapsed)} {describe()}")
        return
    start = wall()
    last = start

    def moved(elapsed: float) -> None:
        nonlocal last
        now = wall()
        if now - last < every:
            return
        last = now
        console.print(f"  ... {virtual_minutes(elapsed)} of at most {virtual_minutes(total)} of "
                      f"virtual time, {describe()} ({now - start:.0f} s)",
                      markup=False, highlight=False)

    yield moved


__all__ = ["PLAIN_EVERY", "rollout_now", "virtual_minutes", "virtual_time_progress"]
