"""LoRA files: reading and writing kohya-format files, per-block weights, SVD resizing.

=======================  ===================================================================
module                   what it holds
=======================  ===================================================================
:mod:`.names`            kohya module names: text-encoder prefixes, base-model family, kernels
:mod:`.delta`            dense ΔW of every module type (LoRA, LoCon incl. Tucker, LoHa, LoKr,
                         full diff), alpha/rank scale, torch's thread count for LoRA work
:mod:`.safetensors_io`   memory-mapped safetensors reading into numpy arrays (every float
                         tensor checked for NaN/Inf), streaming atomic writing with kohya's
                         ``sshs_*`` hashes, output precisions, torch ↔ numpy views
:mod:`.file`             the file model (:class:`~.file.LoraFile`, :class:`~.file.LoraModule`):
                         reading a file, checking its modules, network type, metadata
:mod:`.block_weights`    the LBW/SuperMerger block layouts, presets and the exact r·ΔW merge
:mod:`.rank_rule`        the resize rule (method, value, caps) and its checks, without torch
:mod:`.svd`              kohya-compatible ranks, QR-reduced resizing, one alpha per written file
:mod:`.outputs`          the names of the files the LoRA stages and commands write
=======================  ===================================================================

Nothing is imported here. Reading, checking, block-weighting and writing a file need numpy
only (``charfw lora info`` and ``blocks`` run without torch); :mod:`.svd` and :mod:`.merge`
compute with torch, and a module's ``tensors`` are torch views of its numpy ``arrays``.
"""
