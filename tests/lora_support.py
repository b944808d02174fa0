"""LoRA test material: random modules of every type, and ΔW computed independently.

The reference ΔW here never calls charfw: LoRA/LoCon/Tucker are checked by running the
factors as the layers they are (``F.linear``/``F.conv2d`` one after the other) against the
dense weight, LoHa by summing rank-one outer products, LoKr by assembling the Kronecker
blocks one by one. So a formula error in :mod:`charfw.lora.delta` cannot hide in both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

#: one module name per SD 1.x block used by the tests, by kohya's naming
NAMES = {
    "BASE": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "IN01": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "IN03": "lora_unet_down_blocks_0_downsamplers_0_conv",
    "IN04": "lora_unet_down_blocks_1_attentions_0_proj_in",
    "IN05": "lora_unet_down_blocks_1_resnets_1_conv1",
    "IN10": "lora_unet_down_blocks_3_resnets_0_conv2",
    "M00": "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
    "OUT00": "lora_unet_up_blocks_0_resnets_0_conv_shortcut",
    "OUT05": "lora_unet_up_blocks_1_upsamplers_0_conv",
    "OUT11": "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
    "none": "lora_unet_time_embedding_linear_1",
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, g: torch.Generator, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def lora_linear(out: int, inn: int, r: int, *, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {"lora_down.weight": rand(r, inn, g=g), "lora_up.weight": rand(out, r, g=g), "alpha": torch.tensor(alpha)}


def lora_conv(out: int, inn: int, r: int, k: int = 3, *, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {"lora_down.weight": rand(r, inn, k, k, g=g), "lora_up.weight": rand(out, r, 1, 1, g=g),
            "alpha": torch.tensor(alpha)}


def locon_tucker(out: int, inn: int, r: int, k: int = 3, *, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {"lora_down.weight": rand(r, inn, 1, 1, g=g), "lora_mid.weight": rand(r, r, k, k, g=g),
            "lora_up.weight": rand(out, r, 1, 1, g=g), "alpha": torch.tensor(alpha)}


def loha(out: int, cols: int, r: int, *, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """LoHa with flat factors: ``cols`` is in (Linear) or in·k·k (conv)."""
    g = gen(seed)
    return {"hada_w1_a": rand(out, r, g=g), "hada_w1_b": rand(r, cols, g=g), "hada_w2_a": rand(out, r, g=g),
            "hada_w2_b": rand(r, cols, g=g), "alpha": torch.tensor(alpha)}


def loha_tucker(out: int, inn: int, r: int, k: int = 3, *, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {"hada_t1": rand(r, r, k, k, g=g), "hada_w1_a": rand(r, out, g=g), "hada_w1_b": rand(r, inn, g=g),
            "hada_t2": rand(r, r, k, k, g=g), "hada_w2_a": rand(r, out, g=g), "hada_w2_b": rand(r, inn, g=g),
            "alpha": torch.tensor(alpha)}


def lokr_full(a: int, c: int, b: int, d: int, k: int | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    w2 = rand(b, d, k, k, g=g) if k else rand(b, d, g=g)
    return {"lokr_w1": rand(a, c, g=g), "lokr_w2": w2, "alpha": torch.tensor(3.0)}


def lokr_factored(a: int, c: int, b: int, d: int, r: int, *, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {"lokr_w1_a": rand(a, r, g=g), "lokr_w1_b": rand(r, c, g=g), "lokr_w2_a": rand(b, r, g=g),
            "lokr_w2_b": rand(r, d, g=g), "alpha": torch.tensor(alpha)}


def lokr_tucker(a: int, c: int, b: int, d: int, r: int, k: int = 3, *, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {"lokr_w1": rand(a, c, g=g), "lokr_t2": rand(r, r, k, k, g=g), "lokr_w2_a": rand(r, b, g=g),
            "lokr_w2_b": rand(r, d, g=g), "alpha": torch.tensor(alpha)}


# --- independent ΔW ----------------------------------------------------------------------


def _scale(t: dict[str, torch.Tensor], rank: int | None) -> float:
    alpha = float(t["alpha"]) if "alpha" in t else None
    if rank is None or not alpha:
        return 1.0
    return alpha / rank


def _weight_from_forward(apply: Callable[[torch.Tensor], torch.Tensor], inn: int, k: int | None) -> torch.Tensor:
    """Recover a linear/conv layer's weight by feeding it unit inputs."""
    if k is None:
        eye = torch.eye(inn, dtype=torch.float64)
        return apply(eye).T  # y = x·Wᵀ: rows of the identity give the columns of W
    pad = k // 2
    cols = []
    for i in range(inn):
        x = torch.zeros(1, inn, k, k, dtype=torch.float64)
        x[0, i, pad, pad] = 1.0
        y = apply(x)  # (1, out, k, k): the flipped kernel around the centre
        cols.append(torch.flip(y[0], dims=(-2, -1)))
    return torch.stack(cols, 1)


def reference_delta(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW (float64, scale included) of a module, computed without charfw."""
    t = {k: v.double() for k, v in t.items()}
    out, inn = shape[0], shape[1]
    k = shape[2] if len(shape) == 4 else None
    if "lora_up.weight" in t:
        up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight")
        scale = _scale(t, down.shape[0])
        if k is None:
            return _weight_from_forward(lambda x: F.linear(F.linear(x, down), up), inn, None) * scale
        pad = k // 2

        def conv(x: torch.Tensor) -> torch.Tensor:
            if mid is not None:
                h = F.conv2d(F.conv2d(x, down), mid, padding=pad)
            else:
                h = F.conv2d(x, down, padding=down.shape[-1] // 2)
            return F.conv2d(h, up)

        return _weight_from_forward(conv, inn, k) * scale
    if "hada_w1_a" in t:
        scale = _scale(t, t["hada_w1_b"].shape[0])
        if "hada_t1" in t:
            def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
                total = torch.zeros(out, inn, *core.shape[2:], dtype=torch.float64)
                for a in range(core.shape[0]):
                    for b in range(core.shape[1]):
                        total += torch.einsum("o,i,hw->oihw", wa[a], wb[b], core[a, b])
                return total

            return tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * tucker(
                t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]) * scale
        p1 = sum(torch.outer(t["hada_w1_a"][:, a], t["hada_w1_b"][a]) for a in range(t["hada_w1_b"].shape[0]))
        p2 = sum(torch.outer(t["hada_w2_a"][:, a], t["hada_w2_b"][a]) for a in range(t["hada_w2_b"].shape[0]))
        return (p1 * p2 * scale).reshape(shape)
    if any(key.startswith("lokr_") for key in t):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            core, wa, wb = t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
            w2 = sum(torch.einsum("p,q,hw->pqhw", wa[a], wb[c], core[a, c])
                     for a in range(core.shape[0]) for c in range(core.shape[1]))
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
        scale = _scale(t, rank)
        b, d = w2.shape[0], w2.shape[1]
        delta = torch.zeros(w1.shape[0] * b, w1.shape[1] * d, *w2.shape[2:], dtype=torch.float64)
        for i in range(w1.shape[0]):
            for j in range(w1.shape[1]):
                delta[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j] * w2
        return (delta * scale).reshape(shape)
    return t["diff"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).norm() / b.norm())


def save(path: Path, modules: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str] | None = None,
         extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A kohya-format file written with the safetensors package (not charfw's writer)."""
    from safetensors.torch import save_file

    tensors = {f"{name}.{suffix}": t.contiguous() for name, parts in modules.items() for suffix, t in parts.items()}
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata or {"ss_network_dim": "4"})
    return path


def spectrum_factors(out: int, cols: int, sigmas: list[float], *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """up [out, r], down [r, cols] whose product has exactly the singular values ``sigmas``,
    mixed by a random invertible matrix so that neither factor is orthogonal."""
    g = gen(seed)
    r = len(sigmas)
    qu, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
    qd, _ = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))
    mix = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    s = torch.tensor(sigmas, dtype=torch.float64)
    up = (qu * s) @ mix
    down = torch.linalg.solve(mix, qd.T)
    return up.float(), down.float()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and OpenMP stalls when the CPUs are shared."""
    from charfw.lora.delta import torch_threads

    with torch_threads(1):
        yield
