"""One source of defaults: each stage's Config class carries its params' defaults and descriptions, params.yaml's
base section repeats exactly those defaults (users tune there), profiles override only real params, and
`embedforge <stage> --help` shows every param with its description."""

from __future__ import annotations

import pytest

from components import cli
from components.config import load_params, load_stage_config
from components.stages import STAGES
from tests.helpers import REPO_ROOT

PARAMS_FILE = REPO_ROOT / "params.yaml"
PARAMS = load_params(PARAMS_FILE)
PROFILES = sorted(PARAMS.get("profiles") or {})


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_yaml_base_section_names_exactly_the_config_fields(stage: str) -> None:
    assert set(PARAMS[stage]) == set(STAGES[stage].config_class.model_fields)


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_yaml_base_section_equals_the_config_defaults(stage: str) -> None:
    """Compared as JSON (enums as their values, tuples as lists), key by key, both as written and as validated."""
    model = STAGES[stage].config_class
    defaults = model().model_dump(mode="json")
    section = PARAMS[stage]
    validated = model.model_validate(section).model_dump(mode="json")
    differing = {key: (section[key], defaults[key]) for key in defaults
                 if key in section and (section[key] != defaults[key] or validated[key] != defaults[key])}
    assert not differing, f"params.yaml:{stage} value vs {model.__name__} default: {differing}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_param_has_a_description(stage: str) -> None:
    fields = STAGES[stage].config_class.model_fields
    assert not [name for name, info in fields.items() if not (info.description or "").strip()]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_shows_each_param_with_its_description(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([stage, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    missing = [name for name, info in STAGES[stage].config_class.model_fields.items()
               if f"  {name} = " not in shown or str(info.description) not in shown]
    assert not missing, f"`embedforge {stage} --help` lacks these params or their descriptions: {missing}"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("stage", list(STAGES))
def test_profiles_override_only_params_the_config_has(stage: str, profile: str) -> None:
    model = STAGES[stage].config_class
    overrides = PARAMS["profiles"][profile].get(stage) or {}
    assert set(overrides) <= set(model.model_fields), f"profiles.{profile}.{stage}: unknown keys"
    assert isinstance(load_stage_config(model, stage, PARAMS_FILE, profile), model)
