"""Stage parameters: `params.yaml` sections, profile overrides, and validation before any work starts.

`params.yaml` holds one section per stage (the `default` profile) plus `profiles.<name>.<stage>` overrides.
The active profile is the top-level `profile` key (`dvc exp run -S profile=smoke`) or `--profile` on a CLI.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

PARAMS_FILE = Path("params.yaml")
BASE_PROFILE = "default"


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, so a typo never silently keeps a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that change how a stage runs, never what it produces (shard counts, worker processes): left out
    # of the params digest, so that an artifact made with 1 or 8 shards carries the same provenance.
    execution_fields: ClassVar[frozenset[str]] = frozenset()


ConfigT = TypeVar("ConfigT", bound=StageConfig)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read a params file; a missing or non-mapping file is an error naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}); save the params file as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections, got {type(params).__name__}")
    return params


def resolve_stage_params(params: dict[str, Any], stage: str, profile: str | None = None) -> dict[str, Any]:
    """The stage's section with the active profile's overrides applied, plus the shared top-level keys."""
    profile = profile or params.get("profile", BASE_PROFILE)
    profiles = _mapping(params.get("profiles"), "profiles")
    if profile != BASE_PROFILE and (not isinstance(profile, str) or profile not in profiles):
        known = ", ".join(sorted({BASE_PROFILE, *map(str, profiles)}))
        raise ConfigError(f"profile {profile!r} is not defined; known profiles: {known}")
    if stage not in params:
        raise ConfigError(f"params has no section {stage!r}; sections: {', '.join(sorted(map(str, params)))}")
    section = _mapping(params[stage], stage)
    if profile in profiles:
        overrides = _mapping(profiles[profile], f"profiles.{profile}")
        section = _deep_merge(section, _mapping(overrides.get(stage), f"profiles.{profile}.{stage}"))
    return section


def _mapping(value: object, key: str) -> dict[str, Any]:
    """A params section: a mapping (`null` or absent counts as empty); anything else names the key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of `key: value` params, got {type(value).__name__}")
    return value


def build_config(model: type[ConfigT], section: dict[str, Any], where: str) -> ConfigT:
    """Validate a section into its typed config; the error names each bad key, its value and what is allowed."""
    try:
        return model.model_validate(section)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            shown = "" if error["type"] == "missing" or not key else f" (got {error.get('input')!r})"
            problems.append(f"  {where}{'.' + key if key else ''}: {error['msg']}{shown}")
        raise ConfigError(f"invalid parameters in {where}:\n" + "\n".join(problems)) from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings (values read as YAML: `eps=0.1`, `layers=[0, 3]`, `dims=null`) into a mapping; a dotted
    key sets one entry of a mapping param (`models.base=package:x` keeps the other models)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = [part.strip() for part in key.split(".")]
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE or KEY.ENTRY=VALUE, e.g. --set eps=0.1")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from exc
        for part in reversed(parts[1:]):
            parsed = {part: parsed}
        overrides = _deep_merge(overrides, {parts[0]: parsed})
    return overrides


def load_stage_config(
    model: type[ConfigT], stage: str, params_path: Path = PARAMS_FILE, profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> ConfigT:
    """Read, resolve and validate one stage's config from a params file, with `overrides` applied last."""
    params = load_params(params_path)
    try:
        section = _deep_merge(resolve_stage_params(params, stage, profile), overrides or {})
    except ConfigError as exc:
        raise ConfigError(f"{params_path}: {exc}") from None
    return build_config(model, section, where=f"{params_path}:{stage}")


def params_digest(config: BaseModel) -> str:
    """A stable short hash of a config, recorded in manifests so an artifact says which params made it."""
    exclude = set(getattr(config, "execution_fields", ()))
    canonical = json.dumps(config.model_dump(mode="json", exclude=exclude), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
