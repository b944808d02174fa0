"""LoHa (LyCORIS' low-rank Hadamard product) in the file layout UIs read.

The change to a layer's weight is the element-wise product of two rank-``dim`` products,
``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / dim``, reshaped to the layer's weight
shape; its rank can reach ``dim²`` with the parameters of two LoRAs. The file keys are
LyCORIS' ``hada_w1_a`` ``(out, dim)``, ``hada_w1_b`` ``(dim, in·kh·kw)``, ``hada_w2_a``,
``hada_w2_b`` and ``alpha`` (no Tucker factors), which A1111's and ComfyUI's LyCORIS
loaders read.

``w2_a`` starts at zero (so does ΔW) and the other factors as small noise, as LyCORIS
initialises them. The layer's output gets ``x ⊛ ΔW`` added (the base weights are never
touched, so a frozen half-precision base stays exact).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from ..module import NetworkModule, layer_forward_kwargs


class LoHaModule(NetworkModule):
    file_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")

    def __init__(self, name: str, layer: nn.Module, dim: int, alpha: float | None, *, multiplier: float = 1.0) -> None:
        super().__init__(name, layer, dim, alpha, multiplier=multiplier)
        fan_in = self.in_features * self.kernel_size[0] * self.kernel_size[1]
        self.hada_w1_a = nn.Parameter(torch.empty(self.out_features, dim))
        self.hada_w1_b = nn.Parameter(torch.empty(dim, fan_in))
        self.hada_w2_a = nn.Parameter(torch.empty(self.out_features, dim))
        self.hada_w2_b = nn.Parameter(torch.empty(dim, fan_in))
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        self._conv_kwargs = layer_forward_kwargs(layer)

    def _delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w1 = self.hada_w1_a @ self.hada_w1_b
        w2 = self.hada_w2_a @ self.hada_w2_b
        delta = (w1 * w2) * self.scale
        if self.is_conv:
            delta = delta.reshape(self.out_features, self.in_features, *self.kernel_size)
        return delta if dtype is None else delta.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        x = self._match_input(x, self.hada_w1_a)
        delta = self._delta() * self.multiplier
        if self.is_conv:
            h = functional.conv2d(x, delta, None, **self._conv_kwargs)
        else:
            h = functional.linear(x, delta)
        return out + h.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self._delta().float()
