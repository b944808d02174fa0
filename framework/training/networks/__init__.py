"""Network types a LoRA is trained as, by the name a manifest or ``charfw train`` uses.

=========  ====================  ==========================================  ===========
name       file format           layers                                      in names
=========  ====================  ==========================================  ===========
lora       kohya networks.lora   attention/projections, text encoder          Lora1x1
lora3x3    kohya networks.lora   + resnet and sampler convs (conv_dim)        Lora3x3
loha       LyCORIS LoHa          as lora3x3 (conv_dim 0: as lora)             Loha
=========  ====================  ==========================================  ===========

One folder per method (``lora/``, ``loha/``) holds its ``layer.py``; :mod:`.config` holds
what every method is configured with, :mod:`.targets` selects layers and names them as
kohya does, :mod:`.network` holds the adapters. :func:`create_network` builds a network
for a model, and :func:`detect_file_type` tells which type a kohya file holds (for
continuing from it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from charfw.training.networks.targets import enumerate_targets

from ...errors import CharfwError
from .config import NetworkConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .module import NetworkModule
    from .network import Network
    from .targets import NetworkRoot


@dataclass(frozen=True)
class NetworkType:
    name: str
    #: how the method's output names spell it (``krnk-Lora3x3A50p-...``)
    label: str
    #: wraps convolutions larger than 1x1 unless conv_dim is 0
    conv_by_default: bool
    #: conv_dim may be given at all
    allows_conv: bool
    #: the file key whose first dimension is a module's rank
    rank_key: str
    #: ``ss_network_module`` and LyCORIS' ``algo`` argument, as the file records them
    network_module: str
    algo: str | None
    module_factory: Callable[..., NetworkModule]
    description: str = ""

    def config(self, **settings: object) -> NetworkConfig:
        """This type's configuration from ``dim``, ``alpha``, ``conv_dim``, ``conv_alpha``, ``dropout``."""
        return NetworkConfig(**settings, network_module=self.network_module, algo=self.algo)  # type: ignore[arg-type]

    def make_module(self, name: str, layer: nn.Module, dim: int, alpha: float | None,
                    config: NetworkConfig) -> NetworkModule:
        return self.module_factory(name, layer, dim, alpha, config)


def _lora_module(name: str, layer: nn.Module, dim: int, alpha: float | None, config: NetworkConfig) -> NetworkModule:
    from .lora.layer import LoRAModule

    return LoRAModule(name, layer, dim, alpha, dropout=config.dropout)


def _loha_module(name: str, layer: nn.Module, dim: int, alpha: float | None, config: NetworkConfig) -> NetworkModule:
    from .loha.layer import LoHaModule

    return LoHaModule(name, layer, dim, alpha)


NETWORK_TYPES: dict[str, NetworkType] = {
    "lora": NetworkType("lora", "Lora1x1", False, False, "lora_down.weight", "networks.lora", None, _lora_module,
                        "kohya LoRA on attention, projections and the text encoder"),
    "lora3x3": NetworkType("lora3x3", "Lora3x3", True, True, "lora_down.weight", "networks.lora", None, _lora_module,
                           "kohya LoRA plus the 3x3 convolutions (conv_dim / conv_alpha)"),
    "loha": NetworkType("loha", "Loha", True, True, "hada_w1_b", "lycoris.kohya", "loha", _loha_module,
                        "LyCORIS LoHa (Hadamard product of two low-rank pairs)"),
}
#: the seed's spellings
ALIASES = {"lora1x1": "lora", "lierla": "lora", "c3lier": "lora3x3"}


def network_type(name: str) -> NetworkType:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in NETWORK_TYPES:
        raise CharfwError(f"unknown network '{name}'; known: {', '.join(NETWORK_TYPES)}")
    return NETWORK_TYPES[key]


def create_network(kind: NetworkType, config: NetworkConfig, roots: list[NetworkRoot], *,
                   ranks: Mapping[str, tuple[int, float | None]] | None = None) -> Network:
    """The network of ``kind`` for a model's roots (not yet applied)."""
    from .network import Network

    targets = enumerate_targets(roots, conv3x3=config.conv_dim is not None)
    return Network.create(kind, config, targets, ranks=ranks)


def detect_file_type(state: Mapping[str, torch.Tensor]) -> NetworkType:
    """Which network type a kohya/LyCORIS file holds, from its keys."""
    suffixes = {k.partition(".")[2] for k in state}
    if "hada_w1_a" in suffixes:
        return NETWORK_TYPES["loha"]
    if "lora_down.weight" in suffixes:
        has_conv = any(k.endswith("lora_down.weight") and v.ndim == 4 and v.shape[-1] > 1 for k, v in state.items())
        return NETWORK_TYPES["lora3x3" if has_conv else "lora"]
    kinds = sorted({s.split(".")[0] for s in suffixes})[:4]
    raise CharfwError(f"not a kohya LoRA or LoHa file (its modules hold {', '.join(kinds)})",
                      hint="charfw reads lora_down/lora_up (LoRA, LoCon) and hada_* (LoHa) files")
