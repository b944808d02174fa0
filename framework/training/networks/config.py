"""What a network is configured with: ranks and strengths, and the method its file records."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkConfig:
    """Ranks and strengths of a network, resolved to numbers."""

    #: rank of Linear and 1x1 layers (kohya's network_dim)
    dim: int
    #: kohya's network_alpha; None or 0 means alpha = dim
    alpha: float | None
    #: rank of larger convolutions; None leaves them out (kohya's conv_dim)
    conv_dim: int | None = None
    conv_alpha: float | None = None
    #: kohya's network_dropout (LoRA only)
    dropout: float | None = None
    #: ``ss_network_module`` as kohya / LyCORIS write it
    network_module: str = "networks.lora"
    #: LyCORIS' ``algo`` network argument (``loha``); None for kohya's networks.lora
    algo: str | None = None

    def network_args(self) -> dict[str, str]:
        """``ss_network_args``: the raw ``--network_args`` strings kohya records."""
        args = {"algo": self.algo} if self.algo else {}
        if self.conv_dim is not None:
            args |= {"conv_dim": str(self.conv_dim), "conv_alpha": _number(self.conv_alpha, self.conv_dim)}
        return args

    def rank_for(self, is_conv3x3: bool) -> tuple[int, float | None]:
        if is_conv3x3:
            assert self.conv_dim is not None
            return self.conv_dim, self.conv_alpha
        return self.dim, self.alpha


def _number(value: float | None, default: int) -> str:
    v = float(default) if not value else float(value)
    return str(int(v)) if v.is_integer() else str(v)
