"""Finding model files: a local folder or file, or a Hugging Face repository, never a silent download.

A model option (``model: SmilingWolf/wd-vit-tagger-v3``, ``model: models/wd14``) may
name a folder, a file, or a Hugging Face id. Local paths are tried first (relative to
the workspace, then to the current folder). A Hugging Face id is looked up in the local
Hugging Face cache; only when it is not there, downloading is allowed (``download``)
and the machine is not marked offline (``HF_HUB_OFFLINE``, ``CHARFW_OFFLINE``) is it
fetched, with a line that says what is downloaded and where. Everything else ends in
one line that says which files to put where.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from charfw import console
from charfw.errors import CharfwError, require_module

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


#: the switches that keep charfw and the Hugging Face libraries off the network
OFFLINE_FLAGS = ("CHARFW_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")


def offline_flag() -> str | None:
    """The first offline switch that is set (charfw's or a Hugging Face library's), or None."""
    return next((v for v in OFFLINE_FLAGS if os.environ.get(v, "") not in ("", "0", "false", "False")), None)


def offline() -> bool:
    """True when the user said not to use the network (charfw's or Hugging Face's switch)."""
    return offline_flag() is not None


def local_path(spec: str, bases: Sequence[Path]) -> Path | None:
    """``spec`` as an existing local path (absolute, ``~``, or under one of ``bases``)."""
    candidate = Path(spec).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    for base in bases:
        if (base / candidate).exists():
            return (base / candidate).resolve()
    return None


def resolve_model_dir(spec: str, *, files: Sequence[str], what: str, bases: Sequence[Path],
                      download: bool, patterns: Sequence[str] | None = None) -> Path:
    """The folder that holds a model's ``files``.

    ``spec`` is a local folder, a local file (its folder is used), or a Hugging Face id.
    ``patterns`` (default: ``files``) is what a download fetches.
    """
    found = local_path(spec, bases)
    if found is not None:
        folder = found if found.is_dir() else found.parent
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CharfwError(
                f"{what}: {', '.join(missing)} missing in {folder}",
                path=folder,
                hint=f"a {what} folder holds {', '.join(files)} (download them from the same "
                     "Hugging Face repository)",
            )
        return folder
    if not HF_ID.match(spec):
        raise CharfwError(f"{what}: '{spec}' is neither an existing file or folder nor a Hugging Face id",
                          hint="give a folder with the model files, or an id like owner/name")
    return hf_snapshot(spec, files=files, what=what, download=download, patterns=patterns)


def _hint(repo_id: str, files: Sequence[str]) -> str:
    return (f"download {', '.join(files)} from https://huggingface.co/{repo_id} into a folder "
            f"and give that folder as the model, or run once with network access")


def hf_snapshot(repo_id: str, *, files: Sequence[str], what: str, download: bool,
                patterns: Sequence[str] | None = None) -> Path:
    """The local snapshot folder of a Hugging Face repository holding ``files``."""
    hub = require_module("huggingface_hub", extra="prep", purpose=f"loading the {what} '{repo_id}'")
    allow = list(patterns or files)
    try:
        folder = Path(hub.snapshot_download(repo_id, allow_patterns=allow, local_files_only=True))
        if all((folder / f).is_file() for f in files):
            return folder
    except Exception:  # not cached (LocalEntryNotFoundError), or an incomplete cache
        pass
    if not download or offline():
        why = "downloading is switched off" if not download else "offline"
        raise CharfwError(f"{what} '{repo_id}' is not in the Hugging Face cache ({why})",
                          hint=_hint(repo_id, files))
    console.info(f"downloading the {what} {repo_id} ({', '.join(allow)}) from Hugging Face "
                 f"into its cache (once)")
    try:
        folder = Path(hub.snapshot_download(repo_id, allow_patterns=allow))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CharfwError(f"{what} '{repo_id}' could not be downloaded ({reason[:160]})",
                          hint=_hint(repo_id, files)) from None
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise CharfwError(f"{what} '{repo_id}' has no {', '.join(missing)}",
                          hint="check the repository id")
    return folder
