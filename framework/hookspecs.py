"""The plugin contract: every hook a charfw plugin can implement.

A plugin is a module (or a package's module) with functions decorated with
``@charfw.hookimpl`` whose names are hooks below. Hooks are called with keyword
arguments, so an implementation may accept only the arguments it needs.

Registration hooks receive a ``register`` callable. Call it with a component instance
(a subclass of a base class in :mod:`charfw.components`); its ``name`` is what a
manifest writes. Names are unique per kind: registering a name twice is an error that
names both plugins.

Lifecycle hooks tell plugins what a build is doing; their return values are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    import click

    from charfw.build.plan import Plan
    from charfw.build.run import BuildSummary, StageReport

    from .components import (
        BackgroundRemover,
        BlockMerger,
        Compressor,
        DatasetWriter,
        Drafter,
        ImageFilter,
        ImagePreparer,
        Linter,
        Sampler,
        Source,
        Tagger,
        Trainer,
    )

hookspec = pluggy.HookspecMarker("charfw")
hookimpl = pluggy.HookimplMarker("charfw")


# --- components a manifest picks by name, in stage order ---------------------------------


@hookspec
def register_drafters(register: Callable[[Drafter], None]) -> None:
    """Register drafters for the ``draft`` stage (candidate training images generated for
    each angle code, before ``ingest``; ``charfw adopt`` copies the chosen ones into the
    source folder)."""


@hookspec
def register_sources(register: Callable[[Source], None]) -> None:
    """Register image sources for the ``ingest`` stage: where a part's images come from
    (built in: ``folder``, the folder the manifest names)."""


@hookspec
def register_image_filters(register: Callable[[ImageFilter], None]) -> None:
    """Register image filters for the optional ``filter`` stage: which images go on
    (near-duplicate removal, quality checks)."""


@hookspec
def register_background_removers(register: Callable[[BackgroundRemover], None]) -> None:
    """Register background removers for the ``background`` stage; the engine composites
    their cut-outs onto the colours the options name (built in: ``flat``, which uses the
    image's own transparency)."""


@hookspec
def register_image_preparers(register: Callable[[ImagePreparer], None]) -> None:
    """Register image preparers for the ``prepare`` stage: orientation, colour, size
    (built in: ``square``, fit-and-pad or centre crop)."""


@hookspec
def register_taggers(register: Callable[[Tagger], None]) -> None:
    """Register taggers for the ``tag`` stage and ``charfw tag`` (built in:
    ``angle-rules``, the method's tags from the angle code)."""


@hookspec
def register_dataset_writers(register: Callable[[DatasetWriter], None]) -> None:
    """Register dataset-config writers for the ``dataset`` stage and ``charfw toml``
    (built in: ``kohya-toml``)."""


@hookspec
def register_linters(register: Callable[[Linter], None]) -> None:
    """Register linters for the ``lint`` stage: checks of a part's images, captions and
    training settings before it trains, returning :class:`~charfw.components.Finding`
    lists (built in: ``method``, the method's checks; see ``charfw lint``)."""


@hookspec
def register_trainers(register: Callable[[Trainer], None]) -> None:
    """Register trainers for the ``train`` stage."""


@hookspec
def register_block_mergers(register: Callable[[BlockMerger], None]) -> None:
    """Register block-weight mergers for the ``merge`` stage."""


@hookspec
def register_compressors(register: Callable[[Compressor], None]) -> None:
    """Register LoRA compressors for the ``compress`` stage."""


@hookspec
def register_samplers(register: Callable[[Sampler], None]) -> None:
    """Register samplers for the ``sample`` stage (images made with the finished LoRA)."""


# --- the command line --------------------------------------------------------------------


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``charfw`` command line: decorate functions with
    ``@cli.command()``. Import heavy libraries inside the command, not at module level,
    so that ``charfw --help`` stays fast. A name that is already taken (by charfw or by
    another plugin) is an error that names both; ``charfw plugins`` lists each plugin's
    commands."""


# --- build lifecycle ---------------------------------------------------------------------


@hookspec
def build_started(plan: Plan) -> None:
    """A build is about to run ``plan`` (its targets, parts and stages, in order)."""


@hookspec
def stage_finished(report: StageReport) -> None:
    """A stage of one part has finished: ``report.status`` is ``"ran"`` or
    ``"up to date"``, ``report.output`` its outputs, ``report.seconds`` its time."""


@hookspec
def build_finished(summary: BuildSummary) -> None:
    """A build has ended, completely or not (``summary.stopped`` names the stages that
    could not run). Called before the summary is printed."""


HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, obj in list(globals().items()) if callable(obj) and hasattr(obj, "charfw_spec")
)


def hook_signature(name: str) -> str:
    """``name(arg, ...)`` as the docs show it."""
    import inspect

    fn: Any = globals()[name]
    return f"{name}({', '.join(inspect.signature(fn).parameters)})"
