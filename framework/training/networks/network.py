"""A network: the set of adapters on a model's layers, and its kohya-format state.

:class:`Network` holds one adapter per target layer under its kohya name. It attaches
them (:meth:`Network.apply`), hands the optimizer its parameter groups (UNet and text
encoder at their own learning rates), and reads and writes the tensors of a kohya file
(:meth:`Network.kohya_state_dict`, :meth:`Network.load_kohya_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import CharfwError
from .module import NetworkModule

if TYPE_CHECKING:
    from . import NetworkType
    from .config import NetworkConfig
    from .targets import Target


@dataclass
class LoadReport:
    """What loading a file into a network matched."""

    loaded: list[str] = field(default_factory=list)
    #: modules of the network the file has no weights for (they keep their initial values)
    missing: list[str] = field(default_factory=list)


class Network(nn.Module):
    """Adapters by kohya name, with the type and configuration they were made from."""

    def __init__(self, network_type: NetworkType, config: NetworkConfig, adapters: Mapping[str, NetworkModule],
                 roots: Mapping[str, str], file_keys: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.network_type = network_type
        self.config = config
        self.adapters = nn.ModuleDict(dict(adapters))
        #: adapter name -> "unet" / "text_encoder"
        self.roots = dict(roots)
        #: adapter name -> dotted module path, when the family's files are in diffusers'
        #: peft format (SD 3.5); empty: kohya files
        self.file_keys = dict(file_keys or {})

    @classmethod
    def create(cls, network_type: NetworkType, config: NetworkConfig, targets: list[Target], *,
               ranks: Mapping[str, tuple[int, float | None]] | None = None) -> Network:
        """One adapter per target; ``ranks`` overrides (dim, alpha) per module name."""
        adapters: dict[str, NetworkModule] = {}
        roots: dict[str, str] = {}
        for t in targets:
            dim, alpha = (ranks or {}).get(t.name) or config.rank_for(t.is_conv3x3)
            adapters[t.name] = network_type.make_module(t.name, t.layer, dim, alpha, config)
            roots[t.name] = t.root
        file_keys = {t.name: t.file_key for t in targets if t.file_key}
        return cls(network_type, config, adapters, roots, file_keys)

    # --- attaching -----------------------------------------------------------------------

    def apply(self) -> None:
        for module in self.adapters.values():
            module.apply_to_layer()  # type: ignore[operator]

    def remove(self) -> None:
        for module in self.adapters.values():
            module.remove_from_layer()  # type: ignore[operator]

    def modules_of(self, root: str) -> list[NetworkModule]:
        return [m for n, m in self.adapters.items() if self.roots[n] == root]  # type: ignore[misc]

    # --- training ------------------------------------------------------------------------

    def parameter_groups(self, lrs: Mapping[str, float]) -> list[dict[str, Any]]:
        """One optimizer group per root with a learning rate above zero (kohya leaves a
        root whose rate is 0 out of the optimizer; its modules are still saved)."""
        groups = []
        for root, lr in lrs.items():
            params = [p for m in self.modules_of(root) for p in m.parameters()]
            if params and lr > 0:
                groups.append({"params": params, "lr": lr, "name": root})
        return groups

    def trainable_roots(self, lrs: Mapping[str, float]) -> set[str]:
        return {g["name"] for g in self.parameter_groups(lrs)}

    # --- kohya files ---------------------------------------------------------------------

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors under kohya's keys; every tensor (alpha included) in ``dtype`` if given."""
        out: dict[str, torch.Tensor] = {}
        for name, module in self.adapters.items():
            for key, value in module.state_dict().items():
                value = value.detach()
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                out[f"{name}.{key}"] = value.contiguous().cpu()
        return out

    def file_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors of the file this network is saved as: kohya's keys, or diffusers'
        peft keys (scale folded into ``lora_B``) for a family whose files use them."""
        state = self.kohya_state_dict(dtype)
        if not self.file_keys:
            return state
        from ...lora.peft_format import to_peft

        return to_peft(state, self.file_keys)

    def load_kohya_state_dict(self, state: Mapping[str, torch.Tensor], *, source: str = "the file") -> LoadReport:
        """Load a kohya file's tensors (of this network's kind) into the adapters.

        Every module of the file must exist in the network with the same shapes: a
        mismatch is an error that says which setting differs, not a silent partial load.
        """
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            name, _, suffix = key.partition(".")
            by_module.setdefault(name, {})[suffix] = value
        unknown = sorted(set(by_module) - set(self.adapters))
        if unknown:
            raise CharfwError(
                f"{source} has {len(unknown)} module(s) this network does not have (e.g. {unknown[0]})",
                hint="continue with the same network type, and conv_dim set if the file has conv layers",
            )
        report = LoadReport()
        for name, module in self.adapters.items():
            tensors = by_module.get(name)
            if tensors is None:
                report.missing.append(name)
                continue
            own = module.state_dict()
            if set(tensors) != set(own):
                raise CharfwError(
                    f"{source}: module {name} has {sorted(tensors)}, a {self.network_type.name} module has {sorted(own)}",
                    hint="continue with the network type the file was trained with",
                )
            for key, value in tensors.items():
                if tuple(value.shape) != tuple(own[key].shape):
                    raise CharfwError(
                        f"{source}: {name}.{key} has shape {tuple(value.shape)}, this network's is {tuple(own[key].shape)}",
                        hint="set dim / conv_dim to the file's ranks",
                    )
            module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
            # a module's scale follows its alpha, as in kohya's file loader
            module.scale = float(module.alpha) / module.dim
            report.loaded.append(name)
        return report

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Dense weight changes by module name (multiplier 1)."""
        return {name: m.delta_weight() for name, m in self.adapters.items()}  # type: ignore[operator]


def kohya_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors under kohya's keys: a diffusers/peft-format file (SD 3.5) is
    renamed and given alpha = rank per module (its scale is 1, folded into ``lora_B``)."""
    from ...lora.peft_format import from_peft, is_peft

    if not is_peft(state):
        return dict(state)
    renamed, paths = from_peft(state)
    for name in paths:
        if f"{name}.alpha" not in renamed and f"{name}.lora_down.weight" in renamed:
            renamed[f"{name}.alpha"] = torch.tensor(float(renamed[f"{name}.lora_down.weight"].shape[0]))
    return renamed


def ranks_from_state(state: Mapping[str, torch.Tensor], network_type: NetworkType) -> dict[str, tuple[int, float | None]]:
    """(dim, alpha) per module of a kohya file (kohya's ``dim_from_weights``)."""
    out: dict[str, tuple[int, float | None]] = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        if suffix == network_type.rank_key:
            out[name] = (int(value.shape[0]), out.get(name, (0, None))[1])
        elif suffix == "alpha":
            out[name] = (out.get(name, (0, None))[0], float(value))
    return {k: v for k, v in out.items() if v[0] > 0}
