from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from safeshift.audit import verify_chain
from safeshift.demo import run_demo
from safeshift.state import Action
from safeshift.store import SQLStore, sqlite_url


@pytest.mark.slow
def test_quick_demo_promotes_one_and_rolls_back_the_other(tmp_path: Path) -> None:
    buffer = io.StringIO()
    ok = run_demo(tmp_path, quick=True, console=Console(file=buffer, width=140))
    text = buffer.getvalue()
    assert ok, text
    assert "diagnosis-v2 promoted" in text
    assert "diagnosis-v3 rolled_back: harm proven: error rate" in text
    assert "country=BR" in text
    store = SQLStore(sqlite_url(tmp_path / "safeshift.db"))
    v3 = store.decisions("diagnosis-v3")
    assert v3[-1].action is Action.ROLLBACK
    assert v3[-1].evidence["verdicts"], "the rollback carries its evidence"
    for name in ("diagnosis-v2", "diagnosis-v3"):
        assert verify_chain(store.audit_events(name))[0]
    v2 = [d.action for d in store.decisions("diagnosis-v2")]
    assert v2[-1] is Action.PROMOTE and Action.APPROVE in v2
    store.close()
