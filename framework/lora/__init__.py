"""LoRA files: reading and writing kohya-format files, per-block weights, SVD resizing.

=======================  ===================================================================
module                   what it holds
=======================  ===================================================================
:mod:`.names`            kohya module names: text-encoder prefixes, base-model family, kernels
:mod:`.delta`            dense ΔW of every module type (LoRA, LoCon incl. Tucker, LoHa, LoKr,
                         full diff), alpha/rank scale, torch's thread count for LoRA work
:mod:`.safetensors_io`   memory-mapped safetensors reading, streaming atomic writing with
                         kohya's ``sshs_*`` hashes, output precisions
:mod:`.file`             the file model (:class:`~.file.LoraFile`, :class:`~.file.LoraModule`):
                         reading a file, checking its modules, network type, metadata
:mod:`.block_weights`    the LBW/SuperMerger block layouts, presets and the exact r·ΔW merge
:mod:`.svd`              kohya-compatible rank rules, QR-reduced resizing and multi-file merges
:mod:`.outputs`          the names of the files the LoRA stages and commands write
=======================  ===================================================================

Nothing is imported here: :mod:`.delta`, :mod:`.safetensors_io`, :mod:`.file` and :mod:`.svd`
need torch, and the command line must start without it.
"""
