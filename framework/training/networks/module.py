"""The base of every network module: how a trainable adapter attaches to one layer.

Like kohya's modules, an adapter leaves the wrapped layer in place and replaces its
``forward`` (the layer's own weights, class and ``isinstance`` checks are untouched).
Unlike kohya's, the adapter is also registered as a child of the layer, so the UNet's
(and text encoder's) ``parameters()`` include the adapter's: ``accelerator.prepare(unet)``
then wraps exactly the trainable weights in DistributedDataParallel and gradients are
synchronised across GPUs without a separate network wrapper.

A module's ``state_dict()`` keys are the suffixes of kohya's file keys
(``lora_down.weight``, ``lora_up.weight``, ``alpha``; ``hada_w1_a``, ...), so the file is
``{f"{module.name}.{key}": tensor}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: the attribute under which an adapter is registered on the layer it wraps
CHILD_NAME = "charfw_adapter"


class NetworkModule(nn.Module):
    """An adapter on one ``Linear`` or ``Conv2d`` layer."""

    #: the tensors of one module in a kohya file, as suffixes
    file_keys: tuple[str, ...] = ()

    def __init__(self, name: str, layer: nn.Module, dim: int, alpha: float | None, *, multiplier: float = 1.0) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"{name}: dim must be at least 1")
        self.name = name
        self.dim = dim
        # kohya: a missing or zero alpha means alpha = dim (scale 1)
        alpha = float(dim) if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha), persistent=True)
        self.scale = alpha / dim
        self.multiplier = multiplier
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.in_features = layer.in_channels if self.is_conv else layer.in_features  # type: ignore[union-attr]
        self.out_features = layer.out_channels if self.is_conv else layer.out_features  # type: ignore[union-attr]
        self.kernel_size: tuple[int, int] = tuple(layer.kernel_size) if self.is_conv else (1, 1)  # type: ignore[assignment,union-attr]
        # the layer is reached through a plain attribute, not as a child module, so the
        # module tree has no cycle (the adapter is the layer's child once applied)
        self.__dict__["_layer"] = layer
        self.__dict__["_org_forward"] = None

    # --- attaching -----------------------------------------------------------------------

    @property
    def layer(self) -> nn.Module:
        return self.__dict__["_layer"]

    @property
    def applied(self) -> bool:
        return self.__dict__["_org_forward"] is not None

    def apply_to_layer(self) -> None:
        """Route the layer's forward through this adapter."""
        if self.applied:
            return
        layer = self.layer
        self.__dict__["_org_forward"] = layer.forward
        layer.add_module(CHILD_NAME, self)
        layer.forward = self.forward  # type: ignore[method-assign]

    def remove_from_layer(self) -> None:
        """Give the layer its own forward back."""
        if not self.applied:
            return
        layer = self.layer
        del layer.forward
        del layer._modules[CHILD_NAME]
        self.__dict__["_org_forward"] = None

    @property
    def org_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = self.__dict__["_org_forward"]
        return fn if fn is not None else self.layer.forward

    # --- the adapter's contribution ------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The dense weight change this module adds at multiplier 1 (scale included),
        shaped like the layer's weight."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.name}, dim={self.dim}, alpha={float(self.alpha):g}"

    def _match_input(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Outside autocast, a half-precision layer can feed a float32 adapter; cast then."""
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return x.to(weight.dtype)
        return x


def layer_forward_kwargs(layer: nn.Module) -> dict[str, Any]:
    """The convolution arguments an adapter's dense weight must be applied with."""
    if isinstance(layer, nn.Conv2d):
        return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    return {}
