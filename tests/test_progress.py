"""Progress of long runs: a bar on a terminal, plain lines at most every few seconds when piped."""

from __future__ import annotations

import io

from rich.console import Console

from safeshift.progress import virtual_time_progress


class FakeWall:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_piped_output_gets_a_plain_line_every_few_seconds() -> None:
    out, wall = io.StringIO(), FakeWall()
    console = Console(file=out, force_terminal=False, width=200)
    asked = []

    def describe() -> str:
        asked.append(1)
        return "running"

    with virtual_time_progress(console, 3600, describe, every=10, wall=wall) as moved:
        for second in range(35):  # a minute of virtual time each real second
            wall.now = float(second)
            moved(60.0 * second)
    lines = out.getvalue().splitlines()
    assert lines == [f"  ... {m} min of at most 60 min of virtual time, running ({s} s)"
                     for m, s in ((10, 10), (20, 20), (30, 30))]
    assert len(asked) == 3  # what it is doing is asked only when a line is printed


def test_a_terminal_gets_a_transient_bar_and_no_console_gets_nothing() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with virtual_time_progress(console, 600, lambda: "running") as moved:
        moved(300.0)
    assert "virtual time" in out.getvalue()
    with virtual_time_progress(None, 600, lambda: "never asked") as moved:
        moved(300.0)  # nothing to write to, nothing raised


def test_what_a_rollout_is_doing_names_its_stage() -> None:
    from tests.conftest import plan_dict

    from safeshift import FakeModel, MemoryStore, Plan, Rollout, VirtualClock
    from safeshift.progress import rollout_now

    plan = Plan.from_dict(plan_dict())
    rollout = Rollout.from_plan(plan, store=MemoryStore(), clock=VirtualClock(), start=False,
                                models={"baseline": FakeModel(), "candidate": FakeModel()})
    assert rollout_now(rollout) == "pending"
    rollout.tick()
    assert rollout_now(rollout) == f"running in stage {plan.stages[0].name!r}"
