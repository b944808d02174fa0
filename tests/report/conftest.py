"""The report's tests build with the report on (the suite's default environment turns it off)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def report_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARFW_REPORT", "1")
