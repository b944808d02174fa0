"""Shared fixtures: an isolated environment, example workspaces, the tiny SD 1.5 model.

Every test runs with third-party plugins switched off (``CHARFW_PLUGINS=""``), no
network for Hugging Face libraries, and a fresh plugin cache.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARFW_PLUGINS", "")
    monkeypatch.delenv("CHARFW_PLUGINS_DIR", raising=False)
    monkeypatch.delenv("CHARFW_WORKSPACE", raising=False)
    monkeypatch.delenv("CHARFW_TRACE_PLUGINS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # the HTML report costs about 2 s per fresh build; its own tests (tests/report) turn it on
    monkeypatch.setenv("CHARFW_REPORT", "0")
    from charfw import plugins

    plugins.reset()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of the repository's example workspace (characters/ and their images)."""
    ws = tmp_path / "ws"
    shutil.copytree(REPO / "characters", ws / "characters", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return ws


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run ``charfw ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from charfw.cli import main

    def run(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.5 diffusers folder, built once per test session."""
    from charfw.training.tiny_sd import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sd35(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 3.5 diffusers folder (T5 included), built once per test session."""
    from charfw.training.tiny_sd35 import build_tiny_sd35

    return build_tiny_sd35(tmp_path_factory.mktemp("models") / "tiny-sd35")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL diffusers folder, built once per test session."""
    from charfw.training.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def charfw_exe() -> str:
    """The installed ``charfw`` console script of this interpreter's environment."""
    exe = Path(sys.executable).with_name("charfw")
    return str(exe) if exe.exists() else "charfw"


# --- the hook meta-test's recorder --------------------------------------------------------

#: test name → the hooks called while it ran (only for tests named test_hook_<hook>)
HOOK_CALLS: dict[str, list[str]] = {}


def _recorder(calls: list[str]) -> object:
    """A plugin that implements every hook and only notes that it was called."""
    import charfw
    from charfw import hookspecs

    class Recorder:
        pass

    def make(name: str):
        def impl(self) -> None:  # an implementation may take none of the hook's arguments
            calls.append(name)

        impl.__name__ = name
        return charfw.hookimpl(impl)

    for name in hookspecs.HOOK_NAMES:
        setattr(Recorder, name, make(name))
    return Recorder()


@pytest.fixture(autouse=True)
def record_hook_calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests named ``test_hook_<hook>``: load a recording plugin next to the built-ins, so
    that the meta-test can check the test really called its hook."""
    name = request.node.originalname
    if not name.startswith("test_hook_"):
        return
    from charfw.plugins import PluginInfo, PluginSystem

    calls = HOOK_CALLS.setdefault(name, [])
    original = PluginSystem._load_builtins

    def load_builtins(self: PluginSystem) -> None:
        original(self)
        self._register(_recorder(calls), "test-recorder", PluginInfo("test-recorder", "test", "0"))

    monkeypatch.setattr(PluginSystem, "_load_builtins", load_builtins)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The hook meta-test reads what the hook tests recorded: it runs after them."""
    last = [i for i in items if i.originalname == "test_every_hook_test_calls_its_hook"]  # type: ignore[attr-defined]
    items[:] = [i for i in items if i not in last] + last
