"""ControlNet and the hires fix in charfw.generation.pipeline, on the tiny SD 1.5 (64 px, 3
steps) and tiny ControlNets made from its UNet with ``ControlNetModel.from_unet``.

``from_unet`` starts the zero convolutions at zero (a ControlNet that changes nothing), so
:func:`controlnet_support.make_tiny_controlnet` fills them with random values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from controlnet_support import make_tiny_controlnet
from lora_support import one_torch_thread
from PIL import Image, ImageDraw

from charfw.errors import CharfwError
from charfw.generation.infotext import format_infotext, parse_infotext
from charfw.generation.pipeline import (
    ControlRequest,
    Generator,
    HiresFix,
    ImageRequest,
    parse_control_infotext,
)

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)

SMALL = {"width": 64, "height": 64, "steps": 3, "prompt": "a girl, black background", "seed": 5}


@pytest.fixture(scope="module")
def generator(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generator]:
    root = tmp_path_factory.mktemp("cn")
    gen = Generator(str(tiny_sd15), cache_dir=root / "cache", device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def controlnets(generator: Generator, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("controlnets")
    return (str(make_tiny_controlnet(generator.model.unet, root / "cn-a", 1)),
            str(make_tiny_controlnet(generator.model.unet, root / "cn-b", 2)))


def figure(offset: int = 0) -> Image.Image:
    """A skeleton-like drawing; ``offset`` moves it and turns the background white."""
    image = Image.new("RGB", (64, 64), (255, 255, 255) if offset else (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.line((20 + offset, 8, 20 + offset, 56), fill=(255, 0, 0), width=4)
    draw.ellipse((30, 10 + offset, 50, 30 + offset), fill=(0, 255, 85))
    return image


def make(gen: Generator, **values) -> tuple[np.ndarray, object]:
    [out] = list(gen.generate([ImageRequest(**{**SMALL, **values})]))
    return np.asarray(out.image, dtype=np.int16), out


def test_the_control_image_changes_the_output_and_zero_weight_equals_none(generator, controlnets) -> None:
    plain, _ = make(generator)
    a, out = make(generator, controls=(ControlRequest(figure(), controlnets[0], 0.5),))
    a_again, _ = make(generator, controls=(ControlRequest(figure(), controlnets[0], 0.5),))
    other, _ = make(generator, controls=(ControlRequest(figure(12), controlnets[0], 0.5),))
    zero, _ = make(generator, controls=(ControlRequest(figure(), controlnets[0], 0.0),))
    assert np.array_equal(a, a_again)
    assert np.abs(a - plain).mean() > 1
    assert np.abs(a - other).mean() > 0.05  # the tiny ControlNet reacts weakly, but it does
    assert np.array_equal(zero, plain)
    assert len(generator._controlnets) == 1 + (controlnets[1] in generator._controlnets)  # loaded once
    params = parse_infotext(format_infotext(out.params))
    assert parse_control_infotext(params.extra["ControlNet 0"]) == {
        "Module": "none", "Model": "cn-a", "Weight": "0.5", "Guidance Start": "0", "Guidance End": "1"}


def test_the_control_is_not_used_after_control_guidance_end(generator, controlnets, monkeypatch) -> None:
    """3 steps, end 0.34: step 0 uses the ControlNet, steps 1 and 2 call it with scale 0."""
    net = generator.controlnet(controlnets[0])
    scales: list[float] = []
    original = type(net).forward

    def forward(self, *args, **kwargs):
        scales.append(float(kwargs["conditioning_scale"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(net), "forward", forward)
    _, out = make(generator, controls=(ControlRequest(figure(), controlnets[0], 0.5, 0.0, 0.34),))
    assert scales == [0.5, 0.0, 0.0]
    assert 'Guidance End: 0.34"' in format_infotext(out.params)
    scales.clear()
    make(generator, controls=(ControlRequest(figure(), controlnets[0], 0.5, 0.5, 1.0),))
    assert scales == [0.0, 0.0, 0.5]


def test_two_controlnets_at_once(generator, controlnets) -> None:
    one, _ = make(generator, controls=(ControlRequest(figure(), controlnets[0], 0.5),))
    both, out = make(generator, controls=(ControlRequest(figure(), controlnets[0], 0.5),
                                          ControlRequest(figure(12), controlnets[1], 0.6, 0.0, 0.5)))
    with_zero, _ = make(generator, controls=(ControlRequest(figure(), controlnets[0], 0.5),
                                             ControlRequest(figure(12), controlnets[1], 0.0)))
    assert np.abs(both - one).mean() > 1
    assert np.array_equal(with_zero, one)
    extra = parse_infotext(format_infotext(out.params)).extra
    assert parse_control_infotext(extra["ControlNet 1"])["Model"] == "cn-b"
    assert parse_control_infotext(extra["ControlNet 1"])["Guidance End"] == "0.5"


@pytest.mark.parametrize("controlled", [False, True])
def test_hires_fix_enlarges_and_records_its_infotext(generator, controlnets, controlled: bool) -> None:
    controls = (ControlRequest(figure(), controlnets[0], 0.5, 0, 0.3),) if controlled else ()
    base, _ = make(generator, controls=controls)
    large, out = make(generator, controls=controls, hires=HiresFix(scale=1.5, denoise=0.7))
    assert out.image.size == (96, 96) and base.shape == (64, 64, 3)
    enlarged = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((96, 96), Image.Resampling.LANCZOS),
                          dtype=np.int16)
    assert np.abs(large - enlarged).mean() > 1  # the img2img pass changed it
    params = parse_infotext(format_infotext(out.params))
    assert (params.width, params.height) == (64, 64)  # A1111: Size is the first pass's
    assert (params.denoising_strength, params.hires_upscale) == (0.7, 1.5)
    assert params.extra["Hires upscaler"] == "Lanczos"


def test_missing_controlnet_and_bad_ranges_are_one_line_errors(generator, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "control_openpose.safetensors"
    with pytest.raises(CharfwError, match="ControlNet model not found") as exc:
        make(generator, controls=(ControlRequest(figure(), str(missing)),))
    assert exc.value.path == missing and "\n" not in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CharfwError, match=r"no config\.json"):
        make(generator, controls=(ControlRequest(figure(), str(tmp_path / "empty")),))
    with pytest.raises(CharfwError, match=r"guidance range 0\.5-0\.2"):
        make(generator, controls=(ControlRequest(figure(), str(missing), 1.0, 0.5, 0.2),))


@pytest.mark.parametrize("form", ["ldm.safetensors", "ldm-bare.pth", "diffusers.safetensors"])
def test_a_single_file_controlnet_loads_offline_as_the_same_model(generator, controlnets, tmp_path: Path,
                                                                  form: str) -> None:
    """lllyasviel's layout (with and without ``control_model.``, .pth and .safetensors) and a
    diffusers state dict in one file: configured from the base UNet, no hub access, the
    same tensors and the same image as the diffusers folder."""
    import torch
    from controlnet_support import controlnet_to_ldm
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from charfw.generation.pipeline import load_controlnet

    folder = ControlNetModel.from_pretrained(controlnets[0])
    if form.startswith("ldm"):
        state = controlnet_to_ldm(folder, generator.model.unet.config, "" if "bare" in form else "control_model.")
    else:
        state = {k: v.clone().contiguous() for k, v in folder.state_dict().items()}
    path = tmp_path / f"control_tiny_{form}"
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    net = load_controlnet(str(path), cache_dir=tmp_path / "cache", unet_config=generator.model.unet.config)
    mine, theirs = net.state_dict(), folder.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    control = figure()
    a, _ = make(generator, controls=(ControlRequest(control, controlnets[0], 1.0),))
    b, _ = make(generator, controls=(ControlRequest(control, str(path), 1.0),))
    assert np.array_equal(a, b)


def test_a_single_file_controlnet_for_another_base_model_is_one_line(generator, controlnets,
                                                                    tmp_path: Path) -> None:
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from charfw.generation.pipeline import load_controlnet

    state = ControlNetModel.from_pretrained(controlnets[0]).state_dict()
    wide = dict(generator.model.unet.config)
    wide["block_out_channels"] = [2 * c for c in wide["block_out_channels"]]
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CharfwError, match="made for another base model") as exc:
        load_controlnet(str(path), cache_dir=tmp_path, unet_config=wide)
    assert exc.value.path == path and "\n" not in str(exc.value)
    lora = tmp_path / "not-a-controlnet.safetensors"
    save_file({"lora_unet_x.lora_down.weight": state["conv_in.weight"].contiguous()}, str(lora))
    with pytest.raises(CharfwError, match="not a ControlNet"):
        load_controlnet(str(lora), cache_dir=tmp_path, unet_config=generator.model.unet.config)


def test_a_single_file_sdxl_controlnet_is_configured_from_the_sdxl_unet(tiny_sdxl: Path, tmp_path: Path) -> None:
    """The SDXL UNet's config (text_time embedding, 2048-wide text) makes an SDXL ControlNet's
    config, offline, for a diffusers state dict saved as one file (as SDXL ControlNets ship)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    from charfw.generation.pipeline import load_controlnet

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    folder = ControlNetModel.from_pretrained(make_tiny_controlnet(unet, tmp_path / "cn-xl", 7))
    path = tmp_path / "controlnet-xl.safetensors"
    save_file({k: v.contiguous() for k, v in folder.state_dict().items()}, str(path))
    net = load_controlnet(str(path), cache_dir=tmp_path, unet_config=unet.config)
    assert net.config.addition_embed_type == "text_time"
    mine, theirs = net.state_dict(), folder.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
