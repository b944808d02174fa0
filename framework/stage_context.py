"""What a component sees while a stage runs: the part, its inputs, where to write, how to report."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from charfw.build.hashing import HashCache
from charfw.build.items import ImageItem, from_record_path, to_record_path
from charfw.build.template_library import TemplateLibrary

from . import console
from .errors import CharfwError, ImageError, display_path


class ModelCache:
    """Models loaded for the length of one build (or one command), then released.

    Loading a tagger or a segmentation model takes seconds and hundreds of megabytes, and
    a build runs the same stage for the face and every body. Model-backed components get
    their models with ``ctx.models.get(key, load)``: one load per key per build, created
    once under a lock (stages call in from worker threads). The engine clears the cache
    when the build ends, and a command clears its own when it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[Hashable, Any] = {}

    def get(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._models:
                self._models[key] = factory()
            return self._models[key]

    def __len__(self) -> int:
        return len(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


@dataclass(frozen=True)
class ModelRefs:
    """The base model, VAE and text-encoder settings a part trains and samples with."""

    base: str | None = None
    vae: str | None = None
    clip_skip: int = 2
    family: str = "sd1"


@dataclass(frozen=True)
class PartInfo:
    """One LoRA-to-be: a character's face, one of its bodies, or a group."""

    target: str
    name: str
    #: "face", "body" or "group"
    kind: str
    keyword: str
    class_tokens: str
    tags: tuple[str, ...] = ()
    repeats: int = 1
    symmetric: bool = True
    #: the angle set this part's images follow (None for groups)
    template: str | None = None
    #: the angle codes the part expects
    angles: tuple[str, ...] = ()
    images_dir: Path | None = None
    model: ModelRefs = field(default_factory=ModelRefs)
    #: for a body: its character's face part; for a group: the member parts
    members: tuple[PartInfo, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.target}/{self.name}"

    @property
    def lora_name(self) -> str:
        """What the part's LoRA files are named after: its keyword, with the character's
        name in front when the keyword does not hold it (``krnksf``; ``mia-casual``), so
        that no two characters' files share a name."""
        if self.target.casefold() in self.keyword.casefold():
            return self.keyword
        return f"{self.target}-{self.keyword}"


class StageOutput(BaseModel):
    """What a stage hands to the next ones; stored in its record."""

    model_config = ConfigDict(extra="forbid")

    #: the images, for image stages
    items: list[ImageItem] | None = None
    #: named output files, workspace-relative ("config" for the dataset config, "lora" for
    #: the LoRA to pass on)
    files: dict[str, str] = {}
    #: named output folders, workspace-relative ("images" for the dataset's image folders)
    folders: dict[str, str] = {}
    #: any other JSON data a later stage needs
    data: dict[str, Any] = {}
    #: lines for the build summary ("15 images", "dataset config: build/...")
    summary: list[str] = []
    #: files skipped, one line each (path: reason)
    problems: list[str] = []


@dataclass
class StageContext:
    """Everything a stage's component needs; built by the engine for each stage run."""

    workspace_root: Path
    part: PartInfo
    stage: str
    stage_dir: Path
    #: the outputs of the stages this one depends on, by "<part label>:<stage>"
    inputs: dict[str, StageOutput]
    #: folder for caches shared across parts and targets (latents, model sessions)
    cache_dir: Path
    hash_cache: HashCache
    templates: TemplateLibrary
    strict: bool = False
    force: bool = False
    jobs: int = 1
    problems: list[str] = field(default_factory=list)
    #: the stage's fingerprint (inputs, plugins, options): a trainer can tag resumable
    #: state with it so that state from other settings is never resumed
    fingerprint: str = ""
    #: what the stage's output depends on besides its inputs (its chain of plugins with
    #: versions, options and cache keys, and the part fields it reads), as named records;
    #: set by the engine, and the key under which per-image results are cached
    stage_key: dict[str, Any] = field(default_factory=dict)
    #: models loaded in this build, shared by its stages; cleared when the build ends
    models: ModelCache = field(default_factory=ModelCache)
    #: for a stage that checks the part as a whole (``lint``): the plugin chain of each of
    #: the part's stages that is on, up to the one it guards (``train``), by stage name, as
    #: (component, options) pairs
    part_chains: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)
    #: for the same stages: every character part of the workspace (keyword checks)
    workspace_parts: tuple[PartInfo, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- paths -------------------------------------------------------------------------

    def path(self, record_path: str) -> Path:
        """A workspace-relative path from a record or output, as a real path."""
        return from_record_path(record_path, self.workspace_root)

    def record_path(self, path: Path) -> str:
        """How a path is stored in records and outputs (workspace-relative if possible)."""
        return to_record_path(path, self.workspace_root)

    def sha256(self, path: Path) -> str:
        return self.hash_cache.sha256(path)

    # --- inputs ------------------------------------------------------------------------

    def input(self, key: str | None = None) -> StageOutput:
        """The output of the upstream stage (the only one, or the one named ``key``)."""
        if key is not None:
            return self.inputs[key]
        if len(self.inputs) != 1:
            raise RuntimeError(f"stage {self.stage} has {len(self.inputs)} inputs; name one")
        return next(iter(self.inputs.values()))

    def input_items(self) -> list[ImageItem]:
        items = self.input().items
        return [item.model_copy(deep=True) for item in (items or [])]

    def input_file(self, name: str) -> Path:
        """The upstream file called ``name`` ("config", "lora")."""
        for output in self.inputs.values():
            if name in output.files:
                return self.path(output.files[name])
        raise CharfwError(f"{self.part.label} {self.stage}: no upstream stage produced a '{name}' file")

    # --- reporting ---------------------------------------------------------------------

    def problem(self, path: str | Path, message: str, hint: str | None = None) -> None:
        """Report an input that cannot be used. Strict builds stop here (nothing written);
        otherwise the file is skipped and listed in the summary."""
        if self.strict:
            raise ImageError(message, path=path, hint=hint or "fix or remove it, or build without --strict")
        line = f"{display_path(path)}: {message}"
        with self._lock:
            self.problems.append(line)
        console.warn(f"{line} (skipped)" + (f"; {hint}" if hint else ""))

    def error_problem(self, exc: CharfwError) -> None:
        """Report a :class:`CharfwError` about one file as a problem (skip or stop)."""
        self.problem(exc.path or "?", exc.message, exc.hint)

    def log(self, message: str) -> None:
        console.info(f"{self.part.label} {self.stage}: {message}")

    @contextmanager
    def progress(self, total: int | None, what: str = "", *, unit: str = "img") -> Iterator[console.Bar]:
        desc = f"{self.part.label} {self.stage}" + (f" {what}" if what else "")
        with console.progress(total, desc, unit=unit) as bar:
            yield bar
