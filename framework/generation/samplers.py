"""A1111 and kohya sampler names → diffusers schedulers: one table for both.

A name is resolved to a :class:`SamplerSpec` (:func:`resolve_sampler`): A1111's display name
for the infotext, the diffusers scheduler class and the config values that make it that
sampler. :func:`make_scheduler` builds the scheduler from a pipeline's scheduler config.

**Names accepted** (case, spaces, ``_`` and ``-`` do not matter; ``++`` may be written ``pp``):

* A1111's (``modules/sd_samplers_kdiffusion.py`` ``samplers_k_diffusion``,
  ``modules/sd_samplers_timesteps.py``): ``Euler a``, ``Euler``, ``Heun``, ``LMS``,
  ``DPM++ 2M``, ``DPM++ 2M SDE``, ``DPM++ SDE``, ``DPM2``, ``DPM2 a``, ``DDIM``, ``PLMS``,
  ``UniPC``, each optionally followed by a schedule (``DPM++ 2M Karras``, ``LMS Karras``,
  ``DPM2 a Karras`` …), and A1111's ``k_`` aliases (``k_dpmpp_2m``);
* kohya's ``--sample_sampler`` choices (``library/train_util.py`` ``get_my_scheduler``):
  ``ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver, dpmsolver++,
  dpmsingle, k_lms, k_euler, k_euler_a, k_dpm_2, k_dpm_2_a`` — the same classes kohya
  builds; ``pndm`` is A1111's ``PLMS`` and ``dpmsingle`` A1111's ``DPM++ SDE`` as diffusers'
  table maps it, so an infotext names them so;
* snake forms as ComfyUI and others write them: ``dpmpp_2m_karras``, ``euler_ancestral``,
  ``dpm_2_ancestral``, ``uni_pc``.

**Schedule types.** A1111 ≥ 1.9 writes the sampler and its schedule apart (``Sampler:
DPM++ 2M, Schedule type: Karras``); :func:`resolve_sampler` takes the schedule as its second
argument. As in A1111's ``get_sampler_and_scheduler``, a schedule in the name wins. Mapped
as diffusers' scheduler overview does: ``Karras`` → ``use_karras_sigmas=True``;
``Exponential`` → ``use_exponential_sigmas=True``; ``Beta`` → ``use_beta_sigmas=True`` (both
with ``timestep_spacing="linspace"`` where the class has it; Beta needs scipy);
``SGM Uniform`` and ``Simple`` → ``timestep_spacing="trailing"``. ``Automatic`` is the
sampler's own default in A1111 ≥ 1.9 (``samplers_k_diffusion`` options, read in Forge's
copy of the file): Karras for ``DPM++ 2M`` and ``DPM++ SDE``, Exponential for
``DPM++ 2M SDE``, none for the others; no schedule type at all (``None``, a pre-1.9 text)
means the name alone decides. A schedule the diffusers class cannot do (``Euler a Karras``:
``EulerAncestralDiscreteScheduler`` has no Karras sigmas) is an error, not ignored.

**The infotext name.** :attr:`SamplerSpec.display_name` is the combined pre-1.9 form
(``DPM++ 2M Karras``), which every A1111 version reads (1.9+ splits it again); write it as
``Sampler`` and leave ``Schedule type`` out. kohya's ``dpmsolver`` (first-order DPM-Solver
multistep) has no A1111 sampler, so its display name stays ``dpmsolver``.

**Not the same samples as A1111.** These are diffusers' schedulers, not k-diffusion's
samplers: noise comes from a torch generator, not A1111's ``ImageRNG``; ``DPM++ SDE`` here is
``DPMSolverSinglestepScheduler`` (diffusers' table; the stochastic
``DPMSolverSDEScheduler`` needs torchsde); A1111's UniPC variant/order settings are not
mirrored (diffusers' defaults); the equivalence of A1111's DDIM/PLMS/UniPC with diffusers'
is unverified. kohya forces ``clip_sample=True``; charfw keeps the pipeline's config (and
``clip_sample=False``, SD's value, when it has none), as A1111 does.

Importing this module is cheap; diffusers loads inside :func:`make_scheduler`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CharfwError, MissingDependency

#: kohya's ``--sample_sampler`` choices, in kohya's order
KOHYA_SAMPLERS: tuple[str, ...] = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
    "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)

#: the value of ``Schedule type`` that means "the sampler's default"
AUTOMATIC = "Automatic"

#: the config keys a schedule sets; :func:`make_scheduler` drops them from the base config
_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclass(frozen=True)
class _Base:
    """A sampler without a schedule: A1111's name, the class, its values, other names."""

    name: str
    cls: str
    values: tuple[tuple[str, Any], ...]
    aliases: tuple[str, ...]
    #: the schedule ``Automatic`` means for it in A1111 ≥ 1.9
    automatic: str | None = None


@dataclass(frozen=True)
class _Schedule:
    label: str
    name: str
    #: values the class must accept
    required: tuple[tuple[str, Any], ...]
    #: values set only where the class accepts them
    optional: tuple[tuple[str, Any], ...] = ()


_BASES: tuple[_Base, ...] = (
    _Base("Euler a", "EulerAncestralDiscreteScheduler", (), ("euler_a", "k_euler_a", "euler_ancestral")),
    _Base("Euler", "EulerDiscreteScheduler", (), ("euler", "k_euler")),
    _Base("Heun", "HeunDiscreteScheduler", (), ("heun", "k_heun")),
    _Base("LMS", "LMSDiscreteScheduler", (), ("lms", "k_lms")),
    _Base("DPM++ 2M", "DPMSolverMultistepScheduler",
          (("algorithm_type", "dpmsolver++"), ("solver_order", 2)), ("dpmsolver++", "dpmpp_2m"), "Karras"),
    _Base("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
          (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)), ("dpmpp_2m_sde",), "Exponential"),
    _Base("DPM++ SDE", "DPMSolverSinglestepScheduler",
          (("algorithm_type", "dpmsolver++"), ("solver_order", 2)), ("dpmsingle", "dpmpp_sde"), "Karras"),
    _Base("DPM2", "KDPM2DiscreteScheduler", (), ("dpm_2", "k_dpm_2")),
    _Base("DPM2 a", "KDPM2AncestralDiscreteScheduler", (), ("dpm_2_a", "k_dpm_2_a", "dpm_2_ancestral")),
    _Base("DDIM", "DDIMScheduler", (), ("ddim",)),
    # A1111's PLMS is plain PLMS: no Runge-Kutta warm-up steps
    _Base("PLMS", "PNDMScheduler", (("skip_prk_steps", True),), ("pndm",)),
    _Base("UniPC", "UniPCMultistepScheduler", (), ("uni_pc",)),
    # kohya only; diffusers (0.42) refuses its default final_sigmas_type "zero" for this algorithm
    _Base("dpmsolver", "DPMSolverMultistepScheduler",
          (("algorithm_type", "dpmsolver"), ("solver_order", 2), ("final_sigmas_type", "sigma_min")), ()),
)

_SCHEDULES: tuple[_Schedule, ...] = (
    _Schedule("Karras", "karras", (("use_karras_sigmas", True),)),
    _Schedule("Exponential", "exponential", (("use_exponential_sigmas", True),), (("timestep_spacing", "linspace"),)),
    _Schedule("SGM Uniform", "sgm_uniform", (("timestep_spacing", "trailing"),)),
    _Schedule("Simple", "simple", (("timestep_spacing", "trailing"),)),
    _Schedule("Beta", "beta", (("use_beta_sigmas", True),), (("timestep_spacing", "linspace"),)),
)

#: what each class's ``__init__`` accepts of the keys schedules set (diffusers 0.42; a test
#: checks this against the installed diffusers)
CLASS_SCHEDULE_KEYS: dict[str, frozenset[str]] = {
    **dict.fromkeys(
        ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
         "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"),
        frozenset({*_SIGMA_KEYS, "timestep_spacing"}),
    ),
    "DPMSolverSinglestepScheduler": frozenset(_SIGMA_KEYS),
    **dict.fromkeys(("EulerAncestralDiscreteScheduler", "DDIMScheduler", "PNDMScheduler"),
                    frozenset({"timestep_spacing"})),
}

#: A1111's sampler names as charfw knows them, without and with a schedule (the pre-1.9 list)
A1111_SAMPLERS: tuple[str, ...] = (
    "Euler a", "Euler", "Heun", "LMS", "LMS Karras", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras", "DPM++ SDE", "DPM++ SDE Karras", "DPM2", "DPM2 a", "DPM2 Karras",
    "DPM2 a Karras", "DDIM", "PLMS", "UniPC",
)

#: A1111's schedule types charfw maps
SCHEDULE_TYPES: tuple[str, ...] = (AUTOMATIC, *(s.label for s in _SCHEDULES))


def _key(name: str) -> str:
    """The form names are compared in: lower case, ``++`` as ``pp``, letters, digits and a lone ``+`` only."""
    return re.sub(r"[^a-z0-9+]", "", name.strip().lower().replace("++", "pp"))


_BASE_BY_KEY: dict[str, _Base] = {}
for _base in _BASES:
    for _name in (_base.name, *_base.aliases):
        _BASE_BY_KEY.setdefault(_key(_name), _base)
_SCHEDULE_BY_KEY: dict[str, _Schedule] = {}
for _sched in _SCHEDULES:
    _SCHEDULE_BY_KEY[_key(_sched.label)] = _sched
    _SCHEDULE_BY_KEY[_key(_sched.name)] = _sched


@dataclass(frozen=True)
class SamplerSpec:
    """A resolved sampler: what the infotext says and what diffusers builds."""

    #: A1111's name, schedule included (``DPM++ 2M Karras``): the infotext's ``Sampler``
    display_name: str
    #: the diffusers class (``DPMSolverMultistepScheduler``)
    scheduler_class: str
    #: the config values that make the class this sampler, as ``(key, value)`` pairs
    overrides: tuple[tuple[str, Any], ...]
    #: A1111's sampler without the schedule (``DPM++ 2M``), for A1111 ≥ 1.9's split form
    sampler_name: str
    #: A1111's schedule label (``Karras``), or ``None`` for the sampler's plain schedule
    schedule_type: str | None = None

    @property
    def config_overrides(self) -> dict[str, Any]:
        """:attr:`overrides` as a dict (a fresh one each time)."""
        return dict(self.overrides)


def _suggestion_names() -> dict[str, str]:
    """compared form → the name to suggest (A1111's, kohya's, then the bases' other names)."""
    names: dict[str, str] = {}
    for name in (*A1111_SAMPLERS, *KOHYA_SAMPLERS, *(b.name for b in _BASES),
                 *(a for b in _BASES for a in b.aliases)):
        names.setdefault(_key(name), name)
    return names


def _unknown(kind: str, name: str, candidates: dict[str, str], known: str) -> CharfwError:
    close = difflib.get_close_matches(_key(name), list(candidates), n=1, cutoff=0.6)
    guess = f"did you mean '{candidates[close[0]]}'? " if close else ""
    return CharfwError(f"unknown {kind} '{name}'", hint=f"{guess}known: {known}")


def known_names() -> str:
    """The names an error lists: A1111's, kohya's, and the schedule types."""
    return (f"A1111 {', '.join(A1111_SAMPLERS)}; kohya {', '.join(KOHYA_SAMPLERS)}; "
            f"schedule types {', '.join(SCHEDULE_TYPES)}")


def _lookup(key: str) -> _Base | None:
    base = _BASE_BY_KEY.get(key)
    if base is None and key.startswith("k"):  # A1111's and kohya's k_ aliases
        base = _BASE_BY_KEY.get(key[1:])
    return base


def resolve_schedule(schedule_type: str) -> str | None:
    """A1111's label for a schedule type (``karras`` → ``Karras``); ``None`` for ``Automatic``."""
    key = _key(schedule_type)
    if key == _key(AUTOMATIC):
        return None
    schedule = _SCHEDULE_BY_KEY.get(key)
    if schedule is None:
        candidates = {_key(s): s for s in SCHEDULE_TYPES}
        raise _unknown("schedule type", schedule_type, candidates, ", ".join(SCHEDULE_TYPES))
    return schedule.label


def resolve_sampler(name: str, schedule_type: str | None = None) -> SamplerSpec:
    """The :class:`SamplerSpec` for an A1111, kohya or snake-case sampler name.

    ``schedule_type`` is A1111 ≥ 1.9's ``Schedule type`` (``Karras``, ``Automatic`` …);
    a schedule in the name itself wins over it, as in A1111. Raises a one-line
    :class:`~charfw.errors.CharfwError` for an unknown name (with the closest known name
    and the list) or a schedule the sampler's diffusers class cannot do."""
    key = _key(name)
    base = _lookup(key)
    schedule: _Schedule | None = None
    if base is None:
        for skey, sched in _SCHEDULE_BY_KEY.items():
            if key.endswith(skey) and len(key) > len(skey):
                base = _lookup(key[: -len(skey)])
                if base is not None:
                    schedule = sched
                    break
    if base is None:
        raise _unknown("sampler", name, _suggestion_names(), known_names())
    if schedule is None and schedule_type is not None:
        label = resolve_schedule(schedule_type)
        if label is None:
            label = base.automatic
        schedule = next((s for s in _SCHEDULES if s.label == label), None)
    return _spec(base, schedule)


def _spec(base: _Base, schedule: _Schedule | None) -> SamplerSpec:
    values = dict(base.values)
    if schedule is not None:
        accepted = CLASS_SCHEDULE_KEYS[base.cls]
        for key, value in schedule.required:
            if key not in accepted:
                raise CharfwError(f"sampler '{base.name}' has no {schedule.label} schedule in diffusers "
                                  f"({base.cls} has no {key})",
                                  hint=f"use '{base.name}' alone or another schedule type")
            values[key] = value
        values.update((k, v) for k, v in schedule.optional if k in accepted)
    display = f"{base.name} {schedule.label}" if schedule is not None else base.name
    return SamplerSpec(display_name=display, scheduler_class=base.cls, overrides=tuple(values.items()),
                       sampler_name=base.name, schedule_type=schedule.label if schedule is not None else None)


def all_specs() -> list[SamplerSpec]:
    """Every sampler charfw maps, plain and with each schedule its class can do."""
    out = []
    for base in _BASES:
        out.append(_spec(base, None))
        for sched in _SCHEDULES:
            if all(k in CLASS_SCHEDULE_KEYS[base.cls] for k, _ in sched.required):
                out.append(_spec(base, sched))
    return out


def make_scheduler(sampler: SamplerSpec | str, base_config: Mapping[str, Any], *,
                   schedule_type: str | None = None) -> Any:
    """A diffusers scheduler for ``sampler`` (a :class:`SamplerSpec` or a name for
    :func:`resolve_sampler`, with ``schedule_type``), built with ``from_config`` from the
    pipeline's scheduler config (``pipe.scheduler.config`` or ``scheduler_config.json``).

    The base config keeps the model's own values (betas, ``prediction_type``,
    ``timestep_spacing``, ``steps_offset``); its ``use_*_sigmas`` flags are dropped, since
    the sampler name decides the schedule; ``clip_sample`` defaults to ``False`` (SD's); keys
    the class does not take are left out (diffusers would warn about each). A flow-matching
    config (SD 3.5) gets :func:`flow_scheduler`'s."""
    spec = sampler if isinstance(sampler, SamplerSpec) else resolve_sampler(sampler, schedule_type)
    base_class = str(base_config.get("_class_name", ""))
    if base_class.startswith("FlowMatch"):
        return flow_scheduler(spec, base_config)
    import inspect

    import diffusers

    cls = getattr(diffusers, spec.scheduler_class)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_") and k not in _SIGMA_KEYS}
    config.setdefault("clip_sample", False)
    config.update(spec.overrides)
    try:
        return cls.from_config({k: v for k, v in config.items() if k in accepted})
    except ImportError as exc:  # Beta sigmas need scipy
        raise MissingDependency(f"sampler '{spec.display_name}' needs a package that is not installed ({exc})",
                                hint="install it with: pip install scipy") from None


#: samplers of flow-matching models (SD 3.5): A1111's name → diffusers' flow-match class and
#: values. ``Euler a`` re-noises every step (``stochastic_sampling``: x₀ estimate, then fresh
#: noise at the next sigma), the flow counterpart of an ancestral sampler.
FLOW_SAMPLERS: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {
    "Euler": ("FlowMatchEulerDiscreteScheduler", ()),
    "Euler a": ("FlowMatchEulerDiscreteScheduler", (("stochastic_sampling", True),)),
    "Heun": ("FlowMatchHeunDiscreteScheduler", ()),
}
#: schedules the flow-match Euler scheduler takes (as ``use_*_sigmas``)
FLOW_SCHEDULES = ("Karras", "Exponential", "Beta")


def flow_scheduler(spec: SamplerSpec, base_config: Mapping[str, Any]) -> Any:
    """A flow-matching model's scheduler for ``spec``: its own config (shift included) in
    the class :data:`FLOW_SAMPLERS` names; any other sampler or schedule is a one-line error
    (the noise-prediction samplers do not integrate a flow)."""
    import diffusers

    entry = FLOW_SAMPLERS.get(spec.sampler_name)
    schedule = spec.schedule_type
    if entry is None or (schedule is not None and (schedule not in FLOW_SCHEDULES or spec.sampler_name != "Euler")):
        raise CharfwError(f"sampler '{spec.display_name}' cannot sample a flow-matching model (SD 3.5)",
                          hint="use Euler (optionally Karras, Exponential or Beta), Euler a or Heun")
    cls = getattr(diffusers, entry[0])
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_") and k not in _SIGMA_KEYS}
    config.update(entry[1])
    config.update((k, v) for k, v in spec.overrides if k in _SIGMA_KEYS)
    accepted = set(inspect_parameters(cls))
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def inspect_parameters(cls: type) -> list[str]:
    """The keyword arguments a scheduler class's ``__init__`` takes."""
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
