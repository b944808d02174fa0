"""The network's module names are kohya's, enumerated here independently of charfw's code.

:func:`kohya_names` writes the names down from the SD 1.x architecture as kohya's
``networks/lora.py`` produces them (see reference/kohya-formats.md §1): per transformer
block the attention projections, the feed-forward layers, proj_in/proj_out; with conv_dim
the resnets' conv1/conv2/time_emb_proj (+ conv_shortcut where channels change) and the
samplers' convs; per text-encoder layer q/k/v/out_proj and fc1/fc2, always with the
``text_model`` level. For the real SD 1.5 (built on the meta device) the counts match
kohya's inventory: 264 modules without conv_dim, 350 with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from charfw.training.networks import create_network, network_type
from charfw.training.single_file import shipped_configs


def kohya_names(unet_config: dict[str, Any], text_layers: int, *, conv: bool) -> set[str]:
    channels = unet_config["block_out_channels"]
    per = unet_config["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in unet_config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]
    names: set[str] = set()

    def transformer(prefix: str) -> None:
        block = f"{prefix}_transformer_blocks_0"
        for attn in ("attn1", "attn2"):
            names.update(f"{block}_{attn}_{p}" for p in ("to_q", "to_k", "to_v", "to_out_0"))
        names.update({f"{block}_ff_net_0_proj", f"{block}_ff_net_2", f"{prefix}_proj_in", f"{prefix}_proj_out"})

    def resnet(prefix: str, shortcut: bool) -> None:
        if conv:
            names.update({f"{prefix}_conv1", f"{prefix}_conv2", f"{prefix}_time_emb_proj"})
            if shortcut:
                names.add(f"{prefix}_conv_shortcut")

    out_ch = channels[0]
    for i, attn in enumerate(down_attn):
        in_ch, out_ch = out_ch, channels[i]
        for j in range(per):
            resnet(f"lora_unet_down_blocks_{i}_resnets_{j}", shortcut=j == 0 and in_ch != out_ch)
            if attn:
                transformer(f"lora_unet_down_blocks_{i}_attentions_{j}")
        if i < len(down_attn) - 1 and conv:
            names.add(f"lora_unet_down_blocks_{i}_downsamplers_0_conv")
    transformer("lora_unet_mid_block_attentions_0")
    resnet("lora_unet_mid_block_resnets_0", False)
    resnet("lora_unet_mid_block_resnets_1", False)
    for i, attn in enumerate(up_attn):
        for j in range(per + 1):
            # every up resnet takes the skip connection concatenated: its channels change
            resnet(f"lora_unet_up_blocks_{i}_resnets_{j}", shortcut=True)
            if attn:
                transformer(f"lora_unet_up_blocks_{i}_attentions_{j}")
        if i < len(up_attn) - 1 and conv:
            names.add(f"lora_unet_up_blocks_{i}_upsamplers_0_conv")
    for n in range(text_layers):
        layer = f"lora_te_text_model_encoder_layers_{n}"
        names.update(f"{layer}_self_attn_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
        names.update({f"{layer}_mlp_fc1", f"{layer}_mlp_fc2"})
    return names


@pytest.fixture(scope="module")
def sd15() -> tuple[Any, Any, dict[str, Any]]:
    """SD 1.5's UNet and text encoder from the shipped configs, on the meta device (no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = shipped_configs()["sd15"]
    config = json.loads((folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    return unet, text_encoder, config


def _names(network: str, unet: Any, text_encoder: Any, **kw: Any) -> dict[str, Any]:
    from charfw.training.families.sd1 import SD1Family
    from charfw.training.settings import TrainSettings

    settings = TrainSettings(network=network, dim=4, optimizer="AdamW", **kw)
    net = create_network(network_type(network), settings.network_config(), SD1Family().roots_for(unet, [text_encoder]))
    return dict(net.adapters)


@pytest.mark.parametrize(("network", "conv", "count"), [("lora", False, 264), ("lora3x3", True, 350),
                                                       ("loha", True, 350)])
def test_sd15_names_equal_kohyas(sd15: Any, network: str, conv: bool, count: int) -> None:
    unet, text_encoder, config = sd15
    adapters = _names(network, unet, text_encoder)
    expected = kohya_names(config, 12, conv=conv)
    assert set(adapters) == expected
    assert len(expected) == count  # kohya's inventory (reference/kohya-formats.md §1.4)
    # ranks: the 3x3 convs at conv_dim, everything else at dim; shapes follow the layers
    ff = adapters["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"]
    assert (ff.in_features, ff.out_features) == (1280, 10240)
    if conv:
        conv1 = adapters["lora_unet_up_blocks_0_resnets_0_conv1"]
        assert (conv1.in_features, conv1.kernel_size) == (2560, (3, 3))


def test_loha_without_conv_dim_has_no_resnet_modules(sd15: Any) -> None:
    unet, text_encoder, _ = sd15
    names = set(_names("loha", unet, text_encoder, conv_dim=0))
    assert not any("resnets" in n or "samplers" in n for n in names) and len(names) == 264


def test_tiny_model_names_equal_kohyas(tiny_sd15: Path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    config = json.loads((tiny_sd15 / "unet" / "config.json").read_text())
    layers = text_encoder.config.num_hidden_layers
    assert layers >= 3
    for network, conv in (("lora", False), ("lora3x3", True)):
        assert set(_names(network, unet, text_encoder)) == kohya_names(config, layers, conv=conv)


def test_text_encoder_names_keep_the_text_model_level(sd15: Any) -> None:
    """transformers 5 flattened CLIPTextModel; the names must not follow it."""
    unet, text_encoder, _ = sd15
    te = [n for n in _names("lora", unet, text_encoder) if n.startswith("lora_te")]
    assert te and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
