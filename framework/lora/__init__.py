"""LoRA files: reading and writing kohya-format files, per-block weights, SVD resizing.

=======================  ===================================================================
module                   what it holds
=======================  ===================================================================
:mod:`.file`             the file model (:class:`~.file.LoraFile`, :class:`~.file.LoraModule`),
                         safetensors read/write with kohya's ``sshs_*`` hashes, dense ΔW of
                         every module type (LoRA, LoCon incl. Tucker, LoHa, LoKr, full diff)
:mod:`.block_weights`    the LBW/SuperMerger block layouts, presets and the exact r·ΔW merge
:mod:`.svd`              kohya-compatible rank rules, QR-reduced resizing and multi-file merges
=======================  ===================================================================

Nothing is imported here: :mod:`.file` and :mod:`.svd` need torch, and the command line
must start without it.
"""
