"""charfw.generation.samplers: A1111 and kohya names → diffusers schedulers, one table."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from charfw.errors import CharfwError
from charfw.generation.samplers import (
    A1111_SAMPLERS,
    CLASS_SCHEDULE_KEYS,
    KOHYA_SAMPLERS,
    SCHEDULE_TYPES,
    SamplerSpec,
    all_specs,
    make_scheduler,
    resolve_sampler,
    resolve_schedule,
)

# diffusers' KDPM2/UniPC schedulers feed torch tensors to numpy: thousands of NumPy 2
# DeprecationWarnings per set_timesteps that are not charfw's
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

K, E, B = "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"

#: name → (A1111 display name, diffusers class, values the built scheduler must have)
EXPECTED: dict[str, tuple[str, str, dict[str, Any]]] = {
    # A1111
    "Euler a": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "Euler": ("Euler", "EulerDiscreteScheduler", {K: False}),
    "Heun": ("Heun", "HeunDiscreteScheduler", {K: False}),
    "LMS": ("LMS", "LMSDiscreteScheduler", {K: False}),
    "LMS Karras": ("LMS Karras", "LMSDiscreteScheduler", {K: True}),
    "DPM++ 2M": ("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", K: False}),
    "DPM++ 2M Karras": ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", K: True}),
    "DPM++ 2M SDE": ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", K: False}),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", K: True}),
    "DPM++ SDE": ("DPM++ SDE", "DPMSolverSinglestepScheduler", {K: False}),
    "DPM++ SDE Karras": ("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", {K: True}),
    "DPM2": ("DPM2", "KDPM2DiscreteScheduler", {K: False}),
    "DPM2 a": ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {K: False}),
    "DPM2 Karras": ("DPM2 Karras", "KDPM2DiscreteScheduler", {K: True}),
    "DPM2 a Karras": ("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", {K: True}),
    "DDIM": ("DDIM", "DDIMScheduler", {"clip_sample": False}),
    "PLMS": ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPC", "UniPCMultistepScheduler", {K: False}),
    # kohya (library/train_util.py get_my_scheduler): the same classes
    "ddim": ("DDIM", "DDIMScheduler", {}),
    "pndm": ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMS", "LMSDiscreteScheduler", {}),
    "euler": ("Euler", "EulerDiscreteScheduler", {}),
    "euler_a": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "heun": ("Heun", "HeunDiscreteScheduler", {}),
    "dpm_2": ("DPM2", "KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("dpmsolver", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPM++ SDE", "DPMSolverSinglestepScheduler", {}),
    "k_lms": ("LMS", "LMSDiscreteScheduler", {}),
    "k_euler": ("Euler", "EulerDiscreteScheduler", {}),
    "k_euler_a": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "k_dpm_2": ("DPM2", "KDPM2DiscreteScheduler", {}),
    "k_dpm_2_a": ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}),
    # snake and other spellings
    "dpmpp_2m_karras": ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {K: True}),
    "dpmpp_2m_sde_karras": ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {K: True}),
    "dpmpp_sde": ("DPM++ SDE", "DPMSolverSinglestepScheduler", {}),
    "euler_ancestral": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "uni_pc": ("UniPC", "UniPCMultistepScheduler", {}),
    "k_dpmpp_2m": ("DPM++ 2M", "DPMSolverMultistepScheduler", {}),
    "lms_karras": ("LMS Karras", "LMSDiscreteScheduler", {K: True}),
    "plms": ("PLMS", "PNDMScheduler", {}),
    "  euler   A ": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
}


@pytest.fixture(scope="module")
def sd15_config(tiny_sd15: Path) -> dict[str, Any]:
    return json.loads((tiny_sd15 / "scheduler" / "scheduler_config.json").read_text())


def test_the_lists_cover_the_brief() -> None:
    from charfw.training.settings import SAMPLERS

    assert KOHYA_SAMPLERS == SAMPLERS  # the trainer's --sample_sampler choices
    assert set(A1111_SAMPLERS) | set(KOHYA_SAMPLERS) <= set(EXPECTED)


@pytest.mark.filterwarnings("ignore:.*dpmsolver.*deprecated:FutureWarning")
@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_name_resolves_and_builds(name: str, sd15_config: dict[str, Any]) -> None:
    display, cls, values = EXPECTED[name]
    spec = resolve_sampler(name)
    assert (spec.display_name, spec.scheduler_class) == (display, cls)
    scheduler = make_scheduler(name, sd15_config)
    assert type(scheduler).__name__ == cls
    for key, value in values.items():
        assert scheduler.config[key] == value, key
    # the model's own values are kept
    assert (scheduler.config.beta_schedule, scheduler.config.beta_end) == ("scaled_linear", 0.012)
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


def test_spellings_of_one_sampler_are_the_same() -> None:
    spec = resolve_sampler("DPM++ 2M Karras")
    assert spec == SamplerSpec("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                               (("algorithm_type", "dpmsolver++"), ("solver_order", 2), ("use_karras_sigmas", True)),
                               "DPM++ 2M", "Karras")
    for other in ("dpmpp_2m_karras", "dpm++ 2m karras", "DPMPP-2M-Karras", "dpmpp2mkarras", "k_dpmpp_2m_karras"):
        assert resolve_sampler(other) == spec, other
    # A1111 >= 1.9's split form
    assert resolve_sampler("DPM++ 2M", "Karras") == spec
    assert resolve_sampler("dpmpp_2m", "karras") == spec
    # a schedule in the name wins, as in A1111's get_sampler_and_scheduler
    assert resolve_sampler("DPM++ 2M Karras", "Exponential") == spec


def test_schedule_types(sd15_config: dict[str, Any]) -> None:
    # Automatic is the sampler's own default in A1111 >= 1.9; no schedule type: the name decides
    assert resolve_sampler("DPM++ 2M", "Automatic").display_name == "DPM++ 2M Karras"
    assert resolve_sampler("DPM++ SDE", "Automatic").display_name == "DPM++ SDE Karras"
    assert resolve_sampler("DPM++ 2M SDE", "Automatic").display_name == "DPM++ 2M SDE Exponential"
    assert resolve_sampler("Euler a", "Automatic").display_name == "Euler a"
    assert resolve_sampler("DPM++ 2M").display_name == "DPM++ 2M"
    exp = make_scheduler("Euler", sd15_config, schedule_type="Exponential")
    assert (exp.config[E], exp.config.timestep_spacing) == (True, "linspace")
    sgm = make_scheduler(resolve_sampler("Euler a", "SGM Uniform"), sd15_config)
    assert sgm.config.timestep_spacing == "trailing"
    assert resolve_sampler("euler", "sgm_uniform").display_name == "Euler SGM Uniform"
    assert resolve_sampler("DDIM", "Simple").config_overrides == {"timestep_spacing": "trailing"}
    # DPMSolverSinglestepScheduler has no timestep_spacing: Exponential sets only the sigmas
    assert resolve_sampler("DPM++ SDE Exponential").config_overrides == {
        "algorithm_type": "dpmsolver++", "solver_order": 2, E: True}
    pytest.importorskip("scipy")
    beta = make_scheduler("DPM++ 2M", sd15_config, schedule_type="Beta")
    assert (beta.config[B], beta.config.timestep_spacing) == (True, "linspace")
    assert resolve_schedule("automatic") is None and resolve_schedule("SGM_UNIFORM") == "SGM Uniform"
    assert set(SCHEDULE_TYPES) == {"Automatic", "Karras", "Exponential", "SGM Uniform", "Simple", "Beta"}


def test_a_schedule_the_class_cannot_do_is_an_error() -> None:
    with pytest.raises(CharfwError, match="'Euler a' has no Karras schedule in diffusers") as err:
        resolve_sampler("Euler a Karras")
    assert "EulerAncestralDiscreteScheduler has no use_karras_sigmas" in str(err.value)
    with pytest.raises(CharfwError, match="'DDIM' has no Karras"):
        resolve_sampler("DDIM", "Karras")


def test_unknown_names_are_one_line_errors_with_a_suggestion() -> None:
    for name, guess in (("DPM++ 2M Karas", "DPM++ 2M Karras"), ("eulr_a", "Euler a"), ("dpmsolver+", "dpmsolver"),
                        ("UniPCC", "UniPC")):
        with pytest.raises(CharfwError) as err:
            resolve_sampler(name)
        text = str(err.value)
        assert "\n" not in text
        assert text.startswith(f"unknown sampler '{name}'; did you mean '{guess}'?"), text
        assert "Euler a" in text and "dpm_2_a" in text and "Karras" in text
    with pytest.raises(CharfwError, match=r"^unknown sampler 'turbo'; known: A1111 Euler a"):
        resolve_sampler("turbo")
    with pytest.raises(CharfwError, match="unknown schedule type 'Karas'; did you mean 'Karras'"):
        resolve_sampler("Euler", "Karas")


def test_display_names_resolve_to_themselves() -> None:
    specs = all_specs()
    assert len({s.display_name for s in specs}) == len(specs)
    for spec in specs:
        assert resolve_sampler(spec.display_name) == spec
        assert resolve_sampler(spec.sampler_name, spec.schedule_type or "Automatic").scheduler_class == \
            spec.scheduler_class


@pytest.mark.filterwarnings("ignore:.*dpmsolver.*deprecated:FutureWarning")
def test_every_spec_builds_without_config_warnings(sd15_config: dict[str, Any]) -> None:
    pytest.importorskip("scipy")
    for spec in all_specs():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scheduler = make_scheduler(spec, sd15_config)
        assert type(scheduler).__name__ == spec.scheduler_class
        assert not [w for w in caught if "were passed to" in str(w.message)], spec.display_name
        for key, value in spec.overrides:
            assert scheduler.config[key] == value, (spec.display_name, key)


def test_the_class_table_matches_diffusers() -> None:
    import diffusers

    keys = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing"}
    for cls_name, accepted in CLASS_SCHEDULE_KEYS.items():
        params = set(inspect.signature(getattr(diffusers, cls_name).__init__).parameters)
        assert accepted == keys & params, cls_name


def test_the_base_config_schedule_flags_do_not_leak(sd15_config: dict[str, Any]) -> None:
    karras_base = {**sd15_config, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
                   "prediction_type": "v_prediction"}
    plain = make_scheduler("DPM++ 2M", karras_base)
    assert plain.config.use_karras_sigmas is False
    assert plain.config.prediction_type == "v_prediction"  # the model's values stay


def test_flow_matching_configs_get_flow_samplers() -> None:
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}
    euler = make_scheduler("Euler", config)
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.config.shift == 3.0
    assert not euler.config.stochastic_sampling
    assert make_scheduler("Euler a", config).config.stochastic_sampling
    assert make_scheduler("Euler Karras", config).config.use_karras_sigmas
    assert type(make_scheduler("Heun", config)).__name__ == "FlowMatchHeunDiscreteScheduler"
    for name in ("DPM++ 2M", "DDIM", "Heun Karras"):
        with pytest.raises(CharfwError, match="flow-matching"):
            make_scheduler(name, config)
