"""Stage parameters: profile overrides, strict validation with readable errors, digests, and the real params."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import (
    ConfigError,
    StageConfig,
    build_config,
    load_params,
    load_stage_config,
    parse_overrides,
    params_digest,
    resolve_stage_params,
)
from components.curate import CurateConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
WHERE = "params.yaml:curate"


@pytest.fixture
def params() -> dict:
    return {
        "profile": "default",
        "curate": {"eps": 0.05, "n_clusters": 500, "split_fractions": {"train": 0.8, "dev": 0.1, "test": 0.1}},
        "profiles": {
            "smoke": {"curate": {"n_clusters": 8, "split_fractions": {"train": 0.7, "dev": 0.2}}},
            "full": {},
        },
    }


def test_default_profile_uses_the_stage_section_as_is(params: dict) -> None:
    assert resolve_stage_params(params, "curate") == params["curate"]


def test_profile_overrides_are_deep_merged_into_the_stage_section(params: dict) -> None:
    section = resolve_stage_params(params, "curate", "smoke")
    assert section == {"eps": 0.05, "n_clusters": 8, "split_fractions": {"train": 0.7, "dev": 0.2, "test": 0.1}}
    assert params["curate"]["split_fractions"]["train"] == 0.8  # the base section is not mutated


def test_profile_key_in_the_file_selects_the_profile(params: dict) -> None:
    params["profile"] = "smoke"
    assert resolve_stage_params(params, "curate")["n_clusters"] == 8


def test_profile_without_a_section_for_the_stage_changes_nothing(params: dict) -> None:
    assert resolve_stage_params(params, "curate", "full") == params["curate"]


def test_unknown_profile_is_an_error_listing_the_known_ones(params: dict) -> None:
    with pytest.raises(ConfigError, match=r"profile 'smok' is not defined; known profiles: default, full, smoke"):
        resolve_stage_params(params, "curate", "smok")


def test_missing_stage_section_is_an_error_naming_it(params: dict) -> None:
    with pytest.raises(ConfigError, match=r"no section 'evaluate'"):
        resolve_stage_params(params, "evaluate")


def test_unknown_key_in_a_stage_section_is_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"params\.yaml:curate\.epz: Extra inputs are not permitted \(got 0\.1\)"):
        build_config(CurateConfig, {"epz": 0.1}, where=WHERE)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ({"eps": 0}, "eps", "0"),
        ({"eps": 1.5}, "eps", "1.5"),
        ({"n_clusters": -3}, "n_clusters", "-3"),
        ({"max_pairs": 5}, "max_pairs", "5"),
        ({"embed_dtype": "float16"}, "embed_dtype", "'float16'"),
        ({"keep": "random"}, "keep", "'random'"),
        ({"split_fractions": {"train": 0.8, "dev": 0.1, "test": 0.2}}, "split_fractions", "'test': 0.2"),
        ({"split_fractions": {"train": 0.9, "dev": 0.1}}, "split_fractions", "'dev': 0.1"),
        ({"split_fractions": {"train": 1.1, "dev": -0.1, "test": 0.0}}, "split_fractions", "'dev': -0.1"),
        ({"min_positive_chars": 50, "max_positive_chars": 40}, "min_positive_chars", "50"),
    ],
    ids=["eps-zero", "eps-above-one", "negative-clusters", "max-pairs-tiny", "unknown-dtype", "unknown-keep-rule",
         "fractions-not-summing-to-one", "missing-test-fraction", "negative-fraction", "min-above-max-chars"],
)
def test_out_of_range_value_is_rejected_naming_key_and_value(section: dict, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(CurateConfig, section, where=WHERE)
    message = str(raised.value)
    assert message.startswith(f"invalid parameters in {WHERE}:")
    assert key in message
    assert value in message.split(key, 1)[1]  # the offending value is shown after the key


def test_zero_test_fraction_is_rejected_because_test_is_the_evaluation_set() -> None:
    with pytest.raises(ConfigError, match=r"split_fractions\.test must be > 0"):
        build_config(CurateConfig, {"split_fractions": {"train": 0.9, "dev": 0.1, "test": 0.0}}, where=WHERE)


def test_every_problem_of_a_section_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(CurateConfig, {"eps": 2, "n_clusters": 0, "epz": 1}, where=WHERE)
    assert {"curate.eps", "curate.n_clusters", "curate.epz"} <= set(re.findall(r"curate\.\w+", str(raised.value)))


def test_valid_section_builds_a_frozen_config_with_defaults() -> None:
    config = build_config(CurateConfig, {"eps": 0.1}, where=WHERE)
    assert config.eps == 0.1 and config.n_clusters == CurateConfig.model_fields["n_clusters"].default
    with pytest.raises(ValueError, match="frozen"):
        config.eps = 0.2  # type: ignore[misc]


def test_params_digest_is_stable_for_equal_configs() -> None:
    first = CurateConfig(split_fractions={"train": 0.8, "dev": 0.1, "test": 0.1})
    second = CurateConfig(split_fractions={"test": 0.1, "dev": 0.1, "train": 0.8})
    assert params_digest(first) == params_digest(second)
    assert re.fullmatch(r"[0-9a-f]{16}", params_digest(first))


@pytest.mark.parametrize("change", [{"eps": 0.06}, {"keep": "first"}, {"max_pairs": 600}, {"seed": 43}])
def test_params_digest_changes_with_any_param(change: dict) -> None:
    assert params_digest(CurateConfig()) != params_digest(CurateConfig(**change))


def test_load_params_rejects_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "params.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: params file not found")):
        load_params(missing)


@pytest.mark.parametrize(("text", "expected"), [("curate: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "got list")])
def test_load_params_rejects_a_file_that_is_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ") + ".*" + expected):
        load_params(path)


def test_load_stage_config_names_the_file_and_stage_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("curate:\n  eps: 0\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:curate.eps")):
        load_stage_config(CurateConfig, "curate", path)


def test_overrides_apply_after_the_profile_and_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("curate: {eps: 0.05, n_clusters: 10}\nprofiles: {smoke: {curate: {eps: 0.2}}}\n")
    config = load_stage_config(CurateConfig, "curate", path, "smoke", parse_overrides(["eps=0.1", "max_pairs=null"]))
    assert (config.eps, config.n_clusters, config.max_pairs) == (0.1, 10, None)
    with pytest.raises(ConfigError, match=re.escape(f"{path}:curate.eps")):
        load_stage_config(CurateConfig, "curate", path, None, parse_overrides(["eps=-1"]))


@pytest.mark.parametrize("item", ["eps", "=3", "layers=[0, 1"])
def test_malformed_overrides_are_refused_naming_the_item(item: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"--set {item!r}")):
        parse_overrides([item])


# --- the real params.yaml and dvc.yaml (read only) ---

def _real_params() -> dict:
    return load_params(REPO_ROOT / "params.yaml")


def _profiles() -> list[str]:
    return sorted({"default", *(_real_params().get("profiles") or {})})


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _config_class(stage: str) -> type[StageConfig]:
    """The one StageConfig subclass defined in `components.<stage>`."""
    module = importlib.import_module(f"components.{stage}")
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and issubclass(value, StageConfig) and value.__module__ == module.__name__]
    assert len(classes) == 1, f"components.{stage} should define exactly one StageConfig, found {classes}"
    return classes[0]


@pytest.mark.parametrize("profile", _profiles())
@pytest.mark.parametrize("stage", sorted(_dvc_stages()))
def test_real_params_load_for_every_profile_and_stage(stage: str, profile: str) -> None:
    model = _config_class(stage)
    assert isinstance(load_stage_config(model, stage, REPO_ROOT / "params.yaml", profile), model)


def test_real_params_active_profile_is_defined() -> None:
    assert _real_params()["profile"] in _profiles()


@pytest.mark.parametrize("stage", sorted(_dvc_stages()))
def test_dvc_stage_depends_on_exactly_the_params_sections_it_reads(stage: str) -> None:
    """A stage reads `profile`, its own section and the active profile's override of it: DVC must re-run it when
    (and only when) one of those changes, not when another stage's or another profile's override does. DVC
    resolves `${profile}` from params.yaml, so every profile, `default` included, names every stage."""
    spec = _dvc_stages()[stage]
    assert spec["params"] == ["profile", stage, f"profiles.${{profile}}.{stage}"]
    assert all(stage in section for section in _real_params()["profiles"].values())
    assert "default" in _real_params()["profiles"]
    assert f"python -m components.{stage} " in spec["cmd"]
    assert "--params params.yaml" in spec["cmd"]


PARAM_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
SECTION = st.one_of(
    st.dictionaries(st.sampled_from([*CurateConfig.model_fields, "epz"]), PARAM_VALUES, max_size=4),
    PARAM_VALUES,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SECTION, st.one_of(st.none(), st.sampled_from(["default", "smoke", "nope"]), PARAM_VALUES),
       st.one_of(st.none(), PARAM_VALUES))
def test_any_params_file_gives_a_config_or_a_config_error_naming_the_file(
    tmp_path: Path, section: object, profile: object, profiles: object
) -> None:
    path = tmp_path / "params.yaml"
    document = {"curate": section} | ({"profile": profile} if profile is not None else {}) | (
        {"profiles": profiles} if profiles is not None else {})
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    try:
        config = load_stage_config(CurateConfig, "curate", path)
    except ConfigError as exc:
        assert str(path) in str(exc), str(exc)
    else:
        assert isinstance(config, CurateConfig)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_bytes_as_params_file_give_a_config_or_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    try:
        load_stage_config(CurateConfig, "curate", path)
    except ConfigError as exc:
        assert str(path) in str(exc), str(exc)
