"""Fixtures for the image-preparation tests: tiny stand-in models built offline, no internet.

Every test here runs with the network cut off except for the loopback interface (the
collector's tests talk to a local HTTP server): a name lookup or a connection to any
other address raises, so a test that would download a model fails instead of reaching
the internet.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _is_local(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkBlocked(OSError):
    pass


@pytest.fixture(autouse=True)
def numba_without_jit(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import rembg` imports pymatting, whose numba kernels compile at import time: about
    70 s on this machine in a fresh environment (CI). The tests never run alpha matting, so
    they run pymatting as plain Python instead; rembg's own session code is unchanged. Set
    for each test here and restored after it, so it does not reach the rest of the session
    (a module-level setting did, from collection on)."""
    if "NUMBA_DISABLE_JIT" not in os.environ:
        monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_local(host):
            raise NetworkBlocked(f"network access to {host!r} is blocked in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise NetworkBlocked(f"network access to {address[0]!r} is blocked in tests")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("CHARFW_WD14_MODEL", raising=False)
    monkeypatch.delenv("CHARFW_OFFLINE", raising=False)


# --- stand-in models (built once per session; tests copy what they modify) ----------------


@pytest.fixture(scope="session")
def standins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of stand-ins: wd14-v3/, wd14-v2/ (model.onnx + selected_tags.csv),
    u2net.onnx (320), isnet-anime.onnx (1024), mask-dynamic.onnx (320, any batch)."""
    from tiny_prep_models import build_mask_model, build_wd14_tagger

    root = tmp_path_factory.mktemp("standins")
    build_wd14_tagger(root / "wd14-v3", version="v3")
    build_wd14_tagger(root / "wd14-v2", version="v2")
    build_mask_model(root / "u2net.onnx", size=320)
    build_mask_model(root / "isnet-anime.onnx", size=1024)
    build_mask_model(root / "mask-dynamic.onnx", size=320, dynamic_batch=True)
    return root


@pytest.fixture
def rembg_home(tmp_path: Path, standins: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A rembg models folder (U2NET_HOME) pre-seeded with the u2net and isnet-anime stand-ins."""
    home = tmp_path / "u2net-home"
    home.mkdir()
    for name in ("u2net.onnx", "isnet-anime.onnx"):
        shutil.copy(standins / name, home / name)
    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.setenv("MODEL_CHECKSUM_DISABLED", "1")
    return home


# --- awkward images ---------------------------------------------------------------------


@pytest.fixture
def bad_inputs():
    """A function that writes the files that break naive pipelines into a folder."""
    return write_bad_inputs


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    """Unreadable, 16-bit, CMYK, animated and 1x1 images, next to each other in one folder."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["unreadable"] = folder / "broken.png"
    files["unreadable"].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    files["16bit"] = folder / "deep.png"
    Image.fromarray(arr).save(files["16bit"])  # mode I;16
    files["cmyk"] = folder / "print.jpg"
    Image.new("CMYK", (60, 40), (0, 255, 255, 0)).save(files["cmyk"], quality=95)  # red in CMYK
    files["gif"] = folder / "anim.gif"
    frames = [Image.new("P", (40, 40), i) for i in (1, 2, 3)]
    frames[0].save(files["gif"], save_all=True, append_images=frames[1:], duration=50, loop=0)
    files["tiny"] = folder / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(files["tiny"])
    return files
