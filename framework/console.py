"""Terminal output: messages on stderr, results on stdout, rich progress bars for long work."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

#: results (summaries, listings, dry-run output) go to stdout
out = Console(highlight=False, soft_wrap=True)
#: messages, warnings and progress go to stderr
err = Console(stderr=True, highlight=False, soft_wrap=True)


def quiet() -> bool:
    return os.environ.get("CHARFW_QUIET", "") not in ("", "0")


# --- notices said once ---------------------------------------------------------------------

_said: set[str] = set()


def once(key: str) -> bool:
    """True the first time ``key`` is asked for since the command started (``reset_once``):
    for a notice that is the same for every part of a build (fp16 on a CPU)."""
    if key in _said:
        return False
    _said.add(key)
    return True


def reset_once() -> None:
    _said.clear()


#: third-party log notices that say nothing a charfw user can act on, by the logger that
#: emits them and a text in the message: transformers falls back from torchvision's image
#: processors to PIL ones, which charfw never uses (its pipelines have no safety checker)
HARMLESS_LOG_NOTICES: tuple[tuple[str, str], ...] = (
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)


class _DropNotices:
    """A logging filter that drops records whose message holds one of ``texts``."""

    def __init__(self, texts: tuple[str, ...]) -> None:
        self.texts = texts

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def silence_harmless_notices() -> None:
    """Install the filters for :data:`HARMLESS_LOG_NOTICES` (by logger name, so the
    libraries need not be imported; installing twice is harmless)."""
    import logging

    by_logger: dict[str, tuple[str, ...]] = {}
    for name, text in HARMLESS_LOG_NOTICES:
        by_logger[name] = (*by_logger.get(name, ()), text)
    for name, texts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(texts))  # type: ignore[arg-type]


def info(message: str) -> None:
    if not quiet():
        err.print(message, markup=False)


def warn(message: str) -> None:
    err.print(Text("warning: ", style="yellow") + Text(message))


def error(message: str) -> None:
    for line in message.splitlines() or [""]:
        err.print(Text("error: ", style="bold red") + Text(line))


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slow), like tqdm."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"-- {self.unit}/s", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:.1f} {self.unit}/s", style="progress.data.speed")
        return Text(f"{1 / speed:.1f} s/{self.unit}", style="progress.data.speed")


class Bar:
    """A handle on one progress bar: ``advance()``, ``update(**fields)``."""

    def __init__(self, progress: Progress | None, task_id: Any) -> None:
        self._progress = progress
        self._task = task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextlib.contextmanager
def progress(total: int | None, description: str, *, unit: str = "img", postfix: str = "") -> Iterator[Bar]:
    """A progress bar with count, rate and ETA; silent when stderr is not a terminal."""
    if not err.is_terminal or quiet() or (total is not None and total <= 0):
        yield Bar(None, None)
        return
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[postfix]}"),
    ]
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=total, postfix=postfix)
        yield Bar(bar, task)
