"""Text people and clients write — reasons, actor names, segment values — is shown escaped:
it cannot forge a line of a history nor drive a terminal. Store files are private (0600)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from tests.conftest import plan_dict
from typer.testing import CliRunner

from safeshift import FakeModel, Plan, Rollout, VirtualClock
from safeshift._units import printable
from safeshift.cli import app as cli
from safeshift.store import SQLStore, sqlite_url


@pytest.mark.parametrize(("raw", "shown"), [
    ("fine, checked", "fine, checked"),
    ("ok\n  2 2026-12-01 00:00:00 alice promote", "ok\\n  2 2026-12-01 00:00:00 alice promote"),
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
    ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
    ("tab\tcr\r", "tab\\tcr\\r"),
    ("naïve café 東京", "naïve café 東京"),  # printable non-ASCII stays as written
])
def test_printable(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_history_and_status_escape_what_people_and_clients_wrote(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "s.db")
    clock = VirtualClock()
    rollout = Rollout.from_plan(Plan.from_dict(plan_dict()), store=SQLStore(url), clock=clock,
                                models={"baseline": FakeModel(output=1),
                                        "candidate": FakeModel(output=1)})
    rollout.pause(actor="mallory\n  9 2026-01-01 00:00:00 root", reason="x\x1b]0;pwned\x07")
    rollout.close()
    env = {"COLUMNS": "200"}
    res = CliRunner().invoke(cli, ["history", "test-rollout", "--store", url], env=env)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 2  # start and pause: the actor's newline made no third line
    assert "mallory\\n  9 2026-01-01" in lines[1] and "x\\x1b]0;pwned\\x07" in lines[1]
    assert "\x1b" not in res.output
    res = CliRunner().invoke(cli, ["status", "test-rollout", "--store", url], env=env)
    assert res.exit_code == 0 and "\x1b" not in res.output and "\\x1b]0;pwned" in res.output


def test_sqlite_store_files_are_created_private(tmp_path: Path) -> None:
    path = tmp_path / "private.db"
    store = SQLStore(sqlite_url(path))
    store.list_states()
    for f in [path, *tmp_path.glob("private.db-*")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    store.close()
    # an existing file keeps the mode its owner gave it
    shared = tmp_path / "shared.db"
    shared.touch(mode=0o640)
    shared.chmod(0o640)
    SQLStore(sqlite_url(shared)).close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640
