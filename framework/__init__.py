"""charfw: character manifests in, character LoRAs out (face → body → group).

This module is the public plugin API. A plugin imports what it needs from here::

    import charfw

    class Shout(charfw.Tagger):
        name = "shout"
        needs_pixels = False

        def tag(self, ctx, options, items, images, tags_so_far):
            return [["LOUD"] for _ in items]

    @charfw.hookimpl
    def register_taggers(register):
        register(Shout())

The hooks are specified in :mod:`charfw.hookspecs`; the component base classes live in
:mod:`charfw.components`, the stage context and output types in
:mod:`charfw.stage_context`. Names are resolved on first use, so ``import charfw`` stays
cheap (``charfw --help`` and no-op rebuilds start fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .hookspecs import hookimpl

#: public name → the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["Component", "Options", "Source", "ImageFilter", "BackgroundRemover", "BackgroundOptions",
         "ImagePreparer", "Tagger", "DatasetWriter", "DatasetSpec", "SubsetSpec", "Trainer",
         "Linter", "Finding", "BlockMerger", "Compressor", "Sampler", "parse_color", "color_name"],
        "charfw.components",
    ),
    **dict.fromkeys(["StageContext", "StageOutput", "PartInfo", "ModelRefs", "ModelCache"],
                    "charfw.stage_context"),
    "ImageItem": "charfw.build.items",
    # what the build_started / stage_finished / build_finished hooks receive
    **dict.fromkeys(["Plan", "PlannedStage"], "charfw.build.plan"),
    **dict.fromkeys(["StageReport", "BuildSummary"], "charfw.build.run"),
    **dict.fromkeys(["CharfwError", "MissingDependency", "ImageError"], "charfw.errors"),
}

__all__ = [
    "BackgroundOptions",
    "BackgroundRemover",
    "BlockMerger",
    "BuildSummary",
    "CharfwError",
    "Component",
    "Compressor",
    "DatasetSpec",
    "DatasetWriter",
    "Finding",
    "ImageError",
    "ImageFilter",
    "ImageItem",
    "ImagePreparer",
    "Linter",
    "MissingDependency",
    "ModelCache",
    "ModelRefs",
    "Options",
    "PartInfo",
    "Plan",
    "PlannedStage",
    "Sampler",
    "Source",
    "StageContext",
    "StageOutput",
    "StageReport",
    "SubsetSpec",
    "Tagger",
    "Trainer",
    "__version__",
    "color_name",
    "hookimpl",
    "parse_color",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'charfw' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .build.items import ImageItem
    from .build.plan import Plan, PlannedStage
    from .build.run import BuildSummary, StageReport
    from .components import (
        BackgroundOptions,
        BackgroundRemover,
        BlockMerger,
        Component,
        Compressor,
        DatasetSpec,
        DatasetWriter,
        Finding,
        ImageFilter,
        ImagePreparer,
        Linter,
        Options,
        Sampler,
        Source,
        SubsetSpec,
        Tagger,
        Trainer,
        color_name,
        parse_color,
    )
    from .errors import CharfwError, ImageError, MissingDependency
    from .stage_context import ModelCache, ModelRefs, PartInfo, StageContext, StageOutput
