"""Stage configs: pydantic models next to their code, loaded from YAML or a named recipe, overridden by
`--set key=value`, validated with one-line errors that name the key, the bad value and what is allowed.

    cfg = load_config(TrainConfig, recipe="demo-scratch-pit", overrides=["steps=200", "optim.lr=3e-4"])
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pitlm.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are errors (a typo must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("pitlm.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A named recipe shipped in pitlm/recipes/, or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
    else:
        res = resources.files("pitlm.recipes") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown recipe '{name_or_path}'; known recipes: {', '.join(recipe_names())}")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {name_or_path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {name_or_path} must be a mapping of keys to values")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = dict(data)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{k}' is not a section")
            node[k] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return data


def format_validation_error(err: ValidationError, data: dict[str, Any]) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "<root>"
    missing = [".".join(str(p) for p in x["loc"]) for x in err.errors() if x["type"] == "missing"]
    if missing:  # no recipe given, or a recipe without a required key: say which, not the whole input
        keys = ", ".join(f"'{k}'" for k in missing)
        return (f"missing config key{'s' if len(missing) > 1 else ''} {keys}: give a --recipe that sets "
                f"{'them' if len(missing) > 1 else 'it'} (see `pitlm recipes`) or --set {missing[0]}=...")
    if e["type"] == "extra_forbidden":
        return f"config key '{key}' is not known (check the spelling; `--set` keys must exist in the stage config)"
    bad = e.get("input")
    allowed = e["msg"]
    ctx = e.get("ctx") or {}
    if "expected" in ctx:
        allowed = f"expected {ctx['expected']}"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config key '{key}': bad value {bad!r}: {allowed}{more}"


def build_config(cls: type[C], data: dict[str, Any]) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, data)) from None


def load_config(cls: type[C], recipe: str | None = None, overrides: list[str] | None = None,
                **explicit: Any) -> C:
    """Recipe/YAML (if any) <- explicit CLI flags that are not None <- --set overrides, then validate.

    A recipe may carry a `stage:` key naming its stage; it is dropped here."""
    data = load_recipe(recipe) if recipe else {}
    data.pop("stage", None)
    data.update({k: v for k, v in explicit.items() if v is not None})
    return build_config(cls, apply_overrides(data, overrides))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
