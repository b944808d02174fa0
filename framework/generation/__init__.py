"""Generation: the pieces that make images with a base model and LoRAs, shared by
``charfw generate``, the ``sample`` and ``draft`` stages and the trainer's samples.

=========================  ===========================================================
module                     what it holds
=========================  ===========================================================
:mod:`.pipeline`           the ``Generator``: diffusers pipelines on the loaded modules,
                           per-image seeds, LoRA sets, ControlNet, hires fix, infotext
:mod:`.options`            the options every image-making stage takes
:mod:`.prompts`            A1111 prompt syntax: emphasis, escapes, ``BREAK``,
                           ``<lora:…>`` tags (with LoRA Block Weight's ``lbw=``), the
                           75-token chunks and A1111's weighted encoding
:mod:`.prompt_files`       prompt files: ``positive|||negative`` and kohya's line options
:mod:`.infotext`           A1111's ``parameters`` text (what PNG Info reads): write and parse
:mod:`.samplers`           A1111 and kohya sampler names → diffusers schedulers
:mod:`.lora_patch`         several LoRAs applied exactly from their ΔW, patched once, restored
:mod:`.openpose`           OpenPose skeletons drawn for every angle code, no detector
:mod:`.controls`           the control image of an angle code: drawn OpenPose, the
                           workspace's own file, or canny edges of a template picture
=========================  ===========================================================

Importing this package is cheap; torch, diffusers and OpenCV load inside functions.
"""
