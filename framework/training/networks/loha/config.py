"""LyCORIS LoHa, recorded as LyCORIS' kohya front-end records it (``lycoris.kohya``, algo=loha)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import NetworkConfig


@dataclass(frozen=True)
class LoHaConfig(NetworkConfig):
    network_module: ClassVar[str] = "lycoris.kohya"

    def network_args(self) -> dict[str, str]:
        return {"algo": "loha", **super().network_args()}
