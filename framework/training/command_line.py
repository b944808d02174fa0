"""``charfw train``'s options: every :class:`TrainSettings` field, under charfw's and kohya's names.

Each setting becomes an option spelled with dashes (``--max-train-steps``) and, for people
switching from sd-scripts, with kohya's underscores (``--max_train_steps``) and kohya's own
names where they differ (``--network_dim``, ``--optimizer_type``, ``--network_weights``,
``--pretrained_model_name_or_path``). :func:`translate_kohya_argv` rewrites the parts of a
``train_network.py`` command line click cannot read as they are (``--network_args
"conv_dim=128" "conv_alpha=64"`` lists, ``--network_module``, ``--cache_latents_to_disk``)
and drops options that have no meaning here (``--xformers``: charfw always uses PyTorch's
SDPA attention), so the seed's LoRA.bat line runs with ``charfw train`` in place of
``accelerate launch train_network.py``.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import click

from charfw.build.hashing import fingerprint
from charfw.folders import kohya_config

from ..errors import CharfwError
from .settings import TrainSettings

#: kohya's names for charfw settings, where they differ
KOHYA_NAMES: dict[str, tuple[str, ...]] = {
    "dim": ("network_dim",),
    "alpha": ("network_alpha",),
    "optimizer": ("optimizer_type",),
    "continue_from": ("network_weights",),
    "train_unet_only": ("network_train_unet_only",),
    "learning_rate": ("unet_lr",),
}
#: kohya flags and options accepted and ignored, with why
IGNORED_FLAGS = {
    "xformers": "charfw uses PyTorch's SDPA attention",
    "sdpa": "charfw uses PyTorch's SDPA attention",
    "mem_eff_attn": "charfw uses PyTorch's SDPA attention",
    "persistent_data_loader_workers": "charfw's data pipeline needs no loader workers",
    "lowram": "", "highvram": "",
    "no_half_vae": "charfw's VAE always runs in float32",
}
IGNORED_VALUES = {"max_data_loader_n_workers", "save_model_as", "caption_extension", "log_tracker_name"}
#: kohya options that take several values (nargs="*")
LIST_OPTIONS = {"network_args", "optimizer_args", "text_encoder_lr", "lr_scheduler_args"}


def translate_kohya_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """A ``train_network.py``-style argument list → one click parses; plus notes on what was
    ignored. charfw's own spellings pass through unchanged."""
    args: list[str] = []
    for token in argv:
        if token.startswith("--") and "=" in token and token.split("=", 1)[0][2:] in (
                LIST_OPTIONS | set(IGNORED_FLAGS) | IGNORED_VALUES | {"network_module"}):
            args += token.split("=", 1)
        else:
            args.append(token)
    out: list[str] = []
    notes: list[str] = []
    network_module: str | None = None
    network_args: dict[str, str] = {}
    i = 0
    while i < len(args):
        token = args[i]
        name = token[2:] if token.startswith("--") else None
        if name in LIST_OPTIONS:
            values = []
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            if name == "network_args":
                for v in values:
                    key, sep, value = v.partition("=")
                    if not sep:
                        raise CharfwError(f"--network_args: '{v}' is not key=value")
                    network_args[key.strip()] = value.strip()
            elif name == "optimizer_args":
                for v in values:
                    out += ["--optimizer-arg", v]
            elif name == "text_encoder_lr":
                if values:
                    out += ["--text-encoder-lr", values[0]]
            else:
                raise CharfwError("--lr_scheduler_args is not supported by charfw train",
                                  hint="use --lr-scheduler with its --lr-scheduler-num-cycles / --lr-scheduler-power")
            continue
        if name == "network_module":
            network_module = args[i + 1] if i + 1 < len(args) else ""
            i += 2
            continue
        if name in IGNORED_FLAGS:
            notes.append(f"--{name} ignored" + (f": {IGNORED_FLAGS[name]}" if IGNORED_FLAGS[name] else ""))
            i += 1
            continue
        if name in IGNORED_VALUES:
            value = args[i + 1] if i + 1 < len(args) else ""
            if name == "save_model_as" and value != "safetensors":
                raise CharfwError(f"--save_model_as {value}: charfw writes .safetensors only")
            notes.append(f"--{name} {value} ignored")
            i += 2
            continue
        if name == "cache_latents":
            out += ["--cache-latents", "memory"] if not _value_follows(args, i) else ["--cache-latents"]
            i += 1
            continue
        if name == "cache_latents_to_disk":
            out += ["--cache-latents", "disk"]
            i += 1
            continue
        out.append(token)
        i += 1
    if network_module is not None or network_args:
        out += _network_options(network_module, network_args)
    return out, notes


def _value_follows(args: list[str], i: int) -> bool:
    return i + 1 < len(args) and args[i + 1] in ("disk", "memory", "off")


def _network_options(module: str | None, args: dict[str, str]) -> list[str]:
    algo = args.pop("algo", None)
    out: list[str] = []
    if module in (None, "networks.lora"):
        if algo is not None:
            raise CharfwError("--network_args algo=... belongs to --network_module lycoris.kohya")
        network = "lora3x3" if "conv_dim" in args else "lora"
    elif module == "lycoris.kohya":
        if algo in (None, "lora", "locon"):
            network = "lora3x3"
        elif algo == "loha":
            network = "loha"
        else:
            raise CharfwError(f"LyCORIS algo '{algo}' is not supported by charfw train; use lora, locon or loha")
    else:
        raise CharfwError(f"--network_module {module}: charfw trains networks.lora and lycoris.kohya (algo loha)")
    out += ["--network", network]
    for key in ("conv_dim", "conv_alpha"):
        if key in args:
            out += [f"--{key.replace('_', '-')}", args.pop(key)]
    if args:
        raise CharfwError(f"--network_args {', '.join(sorted(args))} not supported by charfw train",
                          hint="supported: conv_dim, conv_alpha, algo (loha)")
    return out


# --- click options from the settings model -----------------------------------------------


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return args, optional
    return annotation, False


def _click_type(annotation: Any) -> Any:
    base, _ = _base_type(annotation)
    if isinstance(base, list):  # str | float and the like: pydantic decides
        return click.STRING
    if typing.get_origin(base) is Literal:
        return click.Choice([str(v) for v in typing.get_args(base)])
    return {int: click.INT, float: click.FLOAT, str: click.STRING}.get(base, click.STRING)


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with one option per :class:`TrainSettings` field; each
    arrives as ``setting_<name>`` (None when not given, so the model's default applies)."""
    for name, field in reversed(list(TrainSettings.model_fields.items())):
        spellings = [name, *KOHYA_NAMES.get(name, ())]
        help_text = field.description or ""
        default = field.get_default(call_default_factory=True)
        if name == "optimizer_args":
            command = click.option("--optimizer-arg", f"setting_{name}", multiple=True, metavar="KEY=VALUE",
                                   help=f"{help_text} (repeatable)")(command)
            continue
        base, _ = _base_type(field.annotation)
        if base is bool:
            decls = []
            for n in spellings:
                dashed = n.replace("_", "-")
                decls.append(f"--{dashed}/--no-{dashed}")
                if "_" in n:
                    decls.append(f"--{n}/--no_{n}")
            command = click.option(*decls, f"setting_{name}", default=None,
                                   help=f"{help_text} [default: {'on' if default else 'off'}]")(command)
            continue
        decls = []
        for n in spellings:
            decls.append(f"--{n.replace('_', '-')}")
            if "_" in n:
                decls.append(f"--{n}")
        shown = "" if default in (None, "", {}) else f" [default: {default}]"
        command = click.option(*dict.fromkeys(decls), f"setting_{name}", type=_click_type(field.annotation),
                               default=None, help=f"{help_text}{shown}")(command)
    return command


def settings_from_options(values: dict[str, Any], base: dict[str, Any] | None = None) -> TrainSettings:
    """:class:`TrainSettings` from the ``setting_*`` values click collected (given ones only)."""
    from pydantic import ValidationError

    raw: dict[str, Any] = dict(base or {})
    for key, value in values.items():
        if not key.startswith("setting_") or value is None or value == ():
            continue
        name = key[len("setting_") :]
        if name == "optimizer_args":
            parsed = {}
            for item in value:
                k, sep, v = item.partition("=")
                if not sep:
                    raise CharfwError(f"--optimizer-arg '{item}' is not KEY=VALUE")
                parsed[k.strip()] = _literal(v.strip())
            value = parsed
        raw[name] = value
    try:
        return TrainSettings.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise CharfwError(f"--{where.replace('_', '-')}: {first['msg'].removeprefix('Value error, ')}") from None


def _literal(text: str) -> Any:
    """``0.01`` → 0.01, ``True`` → True, ``(0.9,0.99)`` → (0.9, 0.99); else the text."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def default_keyword(dataset: Any) -> str:
    """The first word of the dataset's first class tokens (``krnk girl`` → ``krnk``), else
    the TOML's file name: the first part of the method's output name."""

    try:
        for subset in kohya_config.resolve_subsets(kohya_config.load(dataset)):
            tokens = subset.settings.get("class_tokens")
            if tokens and not subset.settings.get("is_reg"):
                return str(tokens).split()[0].strip(",")
    except CharfwError:
        pass
    return dataset.stem


def run_fingerprint(settings: TrainSettings, dataset: Any, identities: list[Any], clip_skip: int) -> str:
    """What a resumable state of ``charfw train`` is tagged with: the settings that change
    the weights, the dataset config's text, the images' names, sizes and dates, the models."""
    import os
    from pathlib import Path


    images = []
    for subset in kohya_config.resolve_subsets(kohya_config.load(dataset)):
        folder = subset.image_dir
        if folder is not None and not folder.is_absolute():
            folder = Path.cwd() / folder
        if folder is not None and folder.is_dir():
            with os.scandir(folder) as it:
                images += sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it if e.is_file())
    return fingerprint(settings.fingerprint_data(), Path(dataset).read_text("utf-8"), images, identities, clip_skip)
