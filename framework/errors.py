"""Errors a user can fix, and the exit codes the command line returns for them.

Every problem caused by input (a manifest, an image, a missing model file, an unknown
plugin) is raised as a :class:`CharfwError`. The command line prints it as one line that
names the file and says what to do, and exits with the error's :class:`ExitCode`.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Exit codes of the ``charfw`` command."""

    OK = 0
    #: an unexpected error (a bug); the traceback is printed
    INTERNAL_ERROR = 1
    #: the command line itself was wrong (unknown option, missing argument)
    USAGE_ERROR = 2
    #: bad input: a manifest, an image, a model file, a plugin; the message says what to fix
    INPUT_ERROR = 3
    #: a build stopped early because a stage's plugin is not installed; earlier work is kept
    INCOMPLETE = 4
    #: interrupted (Ctrl-C); running the same command again resumes
    INTERRUPTED = 130


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as a user should read it: relative to the working directory when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


class CharfwError(Exception):
    """An error in the user's input, printed as one line without a traceback.

    ``path`` and ``line`` locate the problem; ``hint`` says what to do about it. A
    component's ``check`` that finds one of its options unusable names it in ``option``
    (``optimizer``), and a problem with the part's model names the manifest key in
    ``manifest_key`` (``("model", "base")``): the build then puts the manifest file, line
    and key in front of the message.
    """

    exit_code: ExitCode = ExitCode.INPUT_ERROR

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        hint: str | None = None,
        option: str | None = None,
        manifest_key: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.hint = hint
        self.option = option
        self.manifest_key = manifest_key

    def location(self) -> str:
        if self.path is None:
            return ""
        where = display_path(self.path)
        return f"{where}:{self.line}" if self.line else where

    def __str__(self) -> str:
        text = self.message
        loc = self.location()
        if loc:
            text = f"{loc}: {text}" if not self.line else f"{loc} {text}"
        if self.hint:
            text = f"{text}; {self.hint}"
        return text


class ManifestError(CharfwError):
    """One or more problems in a manifest, each already formatted as ``file:line path: msg``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(self.problems)


class PluginError(CharfwError):
    """A plugin could not be loaded or registered something invalid."""


class ImageError(CharfwError):
    """An image cannot be used (empty, truncated, not an image, too large)."""


class MissingDependency(CharfwError):
    """An optional library is needed for what was asked; the hint says how to install it."""


class BuildIncomplete(CharfwError):
    """A build stopped before a stage whose plugin is not installed."""

    exit_code = ExitCode.INCOMPLETE


def _missing(module: str, extra: str, purpose: str, why: str) -> MissingDependency:
    return MissingDependency(
        f"{purpose} needs the Python package '{module.split('.')[0]}', which is not installed ({why})",
        hint=f"install it with: pip install 'charfw[{extra}]'",
    )


def check_module(module: str, *, extra: str, purpose: str) -> None:
    """Like :func:`require_module`, without importing: for checks before a build, which must
    stay fast when the stage that needs a heavy library is up to date."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as exc:
        raise _missing(module, extra, purpose, str(exc)) from None
    if not found:
        raise _missing(module, extra, purpose, f"No module named '{module}'")


def require_module(module: str, *, extra: str, purpose: str) -> object:
    """Import an optional dependency, or raise a :class:`MissingDependency` with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module, extra, purpose, str(exc)) from None


def read_text(path: str | os.PathLike[str], *, what: str = "", hint: str = "save it as UTF-8",
              encoding: str = "utf-8") -> str:
    """A text file's contents, or a one-line :class:`CharfwError` naming it: ``not UTF-8
    text`` (with ``hint``) or ``cannot read <what> (<reason>)``."""
    try:
        with open(path, encoding=encoding) as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise CharfwError("not UTF-8 text", path=path, hint=hint) from None
    except OSError as exc:
        raise CharfwError(f"cannot read{' ' + what if what else ''} ({exc.strerror or exc})", path=path) from None
