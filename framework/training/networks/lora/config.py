"""kohya's ``networks.lora``: ``lora`` (Linear and 1x1 layers) and ``lora3x3`` (plus conv)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import NetworkConfig


@dataclass(frozen=True)
class LoRAConfig(NetworkConfig):
    network_module: ClassVar[str] = "networks.lora"
