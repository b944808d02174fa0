"""kohya's LoRA module: ``y = layer(x) + up(down(x)) * multiplier * alpha / dim``.

For a ``Linear`` layer ``down`` is ``Linear(in, dim)`` and ``up`` ``Linear(dim, out)``. For a
``Conv2d`` layer ``down`` is a convolution with the layer's own kernel, stride and padding
into ``dim`` channels and ``up`` a 1x1 convolution, so a 3x3 layer's change is
``up @ down`` reshaped to ``(out, in, 3, 3)``: the shapes kohya writes
(``lora_down.weight`` ``(dim, in, 3, 3)``, ``lora_up.weight`` ``(out, dim, 1, 1)``).

``down`` starts as kaiming-uniform noise and ``up`` at zero, so training starts from the
base model exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..module import NetworkModule


class LoRAModule(NetworkModule):
    file_keys = ("lora_down.weight", "lora_up.weight", "alpha")

    def __init__(
        self,
        name: str,
        layer: nn.Module,
        dim: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
    ) -> None:
        super().__init__(name, layer, dim, alpha, multiplier=multiplier)
        if isinstance(layer, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(
                layer.in_channels, dim, layer.kernel_size, layer.stride, layer.padding, bias=False  # type: ignore[arg-type]
            )
            self.lora_up: nn.Module = nn.Conv2d(dim, layer.out_channels, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, dim, bias=False)  # type: ignore[arg-type]
            self.lora_up = nn.Linear(dim, layer.out_features, bias=False)  # type: ignore[arg-type]
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        #: kohya's ``network_dropout``: dropout on the down projection's output
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        if x.dtype != self.lora_down.weight.dtype:
            x = self._match_input(x, self.lora_down.weight)
        h = self.lora_down(x)
        if self.dropout and self.training:
            h = nn.functional.dropout(h, p=self.dropout)
        # scaling the dim-wide hidden state is cheaper than scaling the layer-wide output
        h = self.lora_up(h * (self.multiplier * self.scale))
        return out + h if h.dtype == out.dtype else out + h.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        down = self.lora_down.weight.detach().float()
        up = self.lora_up.weight.detach().float()
        if not self.is_conv:
            delta = up @ down
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(self.out_features, self.in_features, *down.shape[2:])
        return delta * self.scale
