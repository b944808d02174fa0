"""kohya's module names: what a LoRA module's name says about the layer and the base model.

A LoRA file's module name is ``lora_unet_`` or a text-encoder prefix (``lora_te_``; SDXL's
two encoders ``lora_te1_``/``lora_te2_``) followed by the layer's module path with dots as
underscores. SD 1.x/2.x files use diffusers UNet paths (``down_blocks_0_attentions_0_…``),
SDXL files the SGM ones (``input_blocks_4_1_…``). SD 3.5 files come in diffusers' peft
format (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``), read under
OneTrainer's names ``lora_transformer_transformer_blocks_0_attn_to_q`` with ``lora_te1_``
(CLIP-L) and ``lora_te2_`` (CLIP-G) (:mod:`.peft_format`), or in kohya's SD3 format
(``lora_unet_joint_blocks_0_x_block_attn_qkv``).

This module imports no torch: the block-weight rules use it when a manifest is checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

#: the prefixes of text-encoder modules (SD 1.x/2.x, SDXL's two, SD3's third)
TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")

_SGM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|label_emb|time_embed|out)_")
_CONV3_NAME = re.compile(
    r"^lora_unet_(?:.*_(?:conv1|conv2|conv|in_layers_2|out_layers_3|op)|conv_in|conv_out|input_blocks_0_0|out_2)$"
)
_CONV1_NAME = re.compile(r"^lora_unet_.*_(?:conv_shortcut|skip_connection)$")
_PROJ_NAME = re.compile(r"^lora_unet_.*_(?:proj_in|proj_out)$")


#: module names only an SD3/SD 3.5 MMDiT has (diffusers' and kohya's spelling)
_SD3_NAME = re.compile(r"^lora_(?:transformer_transformer_blocks|unet_joint_blocks)_\d+_")


def detect_family(names: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """``sd1``, ``sd2``, ``sdxl``, ``sd35`` or ``unknown``, from module names (and kohya's metadata).

    SD 3.5 (and SD3) files name MMDiT joint blocks (``transformer_blocks_N`` /
    ``joint_blocks_N``); their text encoders are ``lora_te1_``/``lora_te2_`` as SDXL's, so
    they are told apart by the transformer's modules or ``ss_base_model_version``.

    SDXL files have two text encoders (``lora_te1_``/``lora_te2_``) and SGM UNet names;
    SD 1.x/2.x files have ``lora_te_`` and diffusers UNet names. SD 2.x has the same blocks
    as SD 1.x; it is told apart only by ``ss_v2``/``ss_base_model_version``."""
    metadata = metadata or {}
    base = str(metadata.get("ss_base_model_version", ""))
    names = list(names)
    if base.startswith("sd3") or any(_SD3_NAME.match(n) for n in names):
        return "sd35"
    if base.startswith("sdxl") or any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl"
    sd_v2 = metadata.get("ss_v2") == "True" or base.startswith("sd_v2")
    sgm = [n for n in names if _SGM_UNET.match(n)]
    if sgm:
        # ldm-named SD 1.x files exist too: attention at the first level or a 12th block
        sd1_marks = re.compile(r"^lora_unet_(input_blocks_[12]_1_|input_blocks_(9|10|11)_|output_blocks_(9|10|11)_)")
        if any(sd1_marks.match(n) for n in sgm) or any(n.startswith("lora_te_") for n in names):
            return "sd2" if sd_v2 else "sd1"
        return "sdxl"
    if any(n.startswith("lora_unet_add_embedding") for n in names):
        return "sdxl"
    if any(n.startswith(("lora_unet_", "lora_te_")) for n in names):
        return "sd2" if sd_v2 else "sd1"
    return "unknown"


def conv_kernel_from_name(name: str, family: str) -> int | None:
    """The kernel size of the layer a kohya module name points at: 3, 1, or None (Linear).

    Only needed where a file stores a conv factor flattened (LoHa ``hada_w1_b`` [r, in·k·k],
    LoKr ``lokr_w2_b`` [r, d·k·k]), which loses the kernel shape; everything else reads it
    from the tensors. SD 1.x's transformer ``proj_in``/``proj_out`` are 1×1 convs, SD 2.x's
    and SDXL's are Linear."""
    if _CONV3_NAME.match(name):
        return 3
    if _CONV1_NAME.match(name):
        return 1
    if _PROJ_NAME.match(name) and family == "sd1":
        return 1
    return None
