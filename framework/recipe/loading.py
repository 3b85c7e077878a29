"""Loading a recipe: read its YAML, inherit (`extends:`), apply command-line overrides, validate.

Validation checks the size of the data, the engine's sections (`framework.recipe.schema`) and the
plugin names, then validates each plugin's section against the class its `config_schema` hook returns
(`framework.registry.config_schema`). Every problem is a `RecipeError` whose one-line message names the
key path and the file. Torch and the plugins are imported only for that last step, so a recipe whose
YAML, engine sections or plugin names are wrong is answered in a fraction of a second. Loading builds
no plugin manager and reads no shard: starting from a recipe (`framework.startup`) does both.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from framework.recipe.schema import MOVED, NEEDS, Recipe
from framework.registry import PluginError, check_names, config_schema


class RecipeError(Exception):
    """A recipe that cannot run; the message is one line naming the key and the file."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: dicts merge recursively, everything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse(text: str, where: str) -> Any:
    """YAML `text` as data; RecipeError naming `where` (and the line) when it is not YAML or nests too deep
    for the parser (PyYAML recurses once per level)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{where}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    """One recipe file's mapping (empty for an empty file); RecipeError naming the file or line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    data = _parse(text, str(path))
    if data is None:
        return {}
    _check_size(data, f"{path}: the recipe")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


# A recipe is a few hundred values, five levels deep: YAML aliases can make a short text expand to 10^9
# values ("billion laughs"), and a deep nesting exhausts the recursion of whatever walks it.
MAX_VALUES = 100_000
MAX_DEPTH = 50
MAX_EXTENDS = 16  # recipes in one `extends` chain (the shipped ones: 3)


def _check_size(data: Any, what: str) -> None:
    """RecipeError unless `data`, with every YAML alias expanded, holds at most MAX_VALUES values nested at
    most MAX_DEPTH levels: a file, an override's value or the merged recipe, checked before anything walks,
    validates or writes them (a "billion laughs" would exhaust memory in validation or in recipe.yaml)."""
    stack, count = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise RecipeError(f"{what} expands to more than {MAX_VALUES} values (YAML aliases?)")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{what} is nested deeper than {MAX_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and everything it `extends`, merged (the recipe wins)."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: `extends` cycle: {' -> '.join(p.name for p in (*_seen, path))}")
    if len(_seen) == MAX_EXTENDS:
        raise RecipeError(f"{_seen[-1]}: extends: a chain of more than {MAX_EXTENDS} recipes (from {_seen[0].name})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a file name, got {type(parent).__name__}")
    parent_path = path.parent / parent
    if not parent_path.exists():
        raise RecipeError(f"{path}: extends: no such recipe {parent_path}")
    return deep_merge(load_raw(parent_path, (*_seen, path)), data)


_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `1.0e-3`, `[1, 2]`, `null`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not _KEY.match(key):
            raise RecipeError(f"override {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise RecipeError(f"override {key}: the value is nested deeper than {MAX_DEPTH} levels") from None
        _check_size(value, f"override {key}: the value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


_SHORT = reprlib.Repr()  # a value in a message: its first items and characters, however long it is
_SHORT.maxstring = _SHORT.maxother = 120


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    """The first validation error as one line: its key path under `prefix`, the message and the value."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    got = f" (got {_SHORT.repr(err['input'])})" if err["type"] not in ("missing", "extra_forbidden") else ""
    return f"{loc or '<root>'}: {err['msg']}{got}{more}"


def _check_moved(data: dict[str, Any]) -> None:
    """RecipeError naming the first key of `data` that has moved to another section (`schema.MOVED`): an
    older recipe is told where the key is now, not that it is unknown."""
    for section, keys in data.items():
        for key in keys if isinstance(keys, dict) else ():
            if (moved := MOVED.get(f"{section}.{key}")) is not None:
                raise RecipeError(f"{section}.{key} moved to {moved}")


def as_written_now(saved: dict[str, Any]) -> dict[str, Any]:
    """A `recipe.yaml` augssl wrote into a run or checkpoint before `train` was split, with each moved key
    (`schema.MOVED`) in its section now; a recipe.yaml written since is returned as it is. (A recipe a user
    writes is not rewritten: a moved key there is an error saying where it went.)"""
    data = copy.deepcopy(saved)
    train = data.get("train")
    if not isinstance(train, dict):
        return data
    for key in list(train):
        if (moved := MOVED.get(f"train.{key}")) is not None:
            section, name = moved.split(".")
            data.setdefault(section, {})[name] = train.pop(key)
    return data


def validate_recipe(data: dict[str, Any], extra_plugins: Mapping[str, object] | None = None) -> Recipe:
    """Validate merged recipe data: the engine's sections, the plugin names, then each plugin's section
    against the class its `config_schema` hook returns (`framework.registry.config_schema`, which loads the
    plugin but builds no plugin manager; so a recipe whose engine sections or names are wrong is refused
    before torch is imported).

    `extra_plugins` are plugin objects by name beside those the recipe names (tests and embedding
    applications); their section defaults to `{}`, and they come after the recipe's own plugins.
    """
    _check_size(data, "the recipe")
    _check_moved(data)
    extra = extra_plugins or {}
    plugins_raw = data.get("plugins")
    if not isinstance(plugins_raw, dict) or not plugins_raw:
        raise RecipeError("plugins: a recipe must name at least one plugin (e.g. plugins: {backbones: ..., kl: ...})")
    plugins_raw = {name: section for name, section in plugins_raw.items() if section is not None}
    plugins_raw.update({name: {} for name in extra if name not in plugins_raw})
    for name, section in plugins_raw.items():
        if not isinstance(section, dict):
            raise RecipeError(f"plugins.{name}: expected a mapping of settings, got {section!r}")
    try:
        recipe = Recipe.model_validate({**data, "plugins": plugins_raw})
    except ValidationError as exc:
        raise RecipeError(_first_error(exc)) from None

    names = [name for name in plugins_raw if name not in extra] + list(extra)
    try:
        check_names(name for name in names if name not in extra)
        schemas = {name: config_schema(name, extra.get(name)) for name in names}
    except PluginError as exc:
        raise RecipeError(f"plugins: {exc}") from None
    needs: dict[str, frozenset[str]] = {name: getattr(schema, "needs", frozenset()) for name, schema in schemas.items()}
    validated = {}
    for name, schema in schemas.items():
        try:
            validated[name] = schema.model_validate(plugins_raw[name], context={NEEDS: needs})
        except ValidationError as exc:
            raise RecipeError(_first_error(exc, f"plugins.{name}")) from None
    recipe.plugins = validated
    if len(recipe.data.mean) != recipe.data.channels or len(recipe.data.std) != recipe.data.channels:
        raise RecipeError(f"data.mean/data.std: need {recipe.data.channels} values (data.channels)")
    for tracker in recipe.log.trackers:
        if importlib.util.find_spec(tracker) is None:
            raise RecipeError(f"log.trackers: {tracker} is not installed (pip install {tracker})")
    return recipe


def in_file(path: str | Path, exc: RecipeError) -> RecipeError:
    """`exc` naming the recipe file `path` (unless its message starts with it already)."""
    msg = str(exc)
    return RecipeError(msg if msg.startswith(str(Path(path).resolve())) else f"{path}: {msg}")


def write_resolved(recipe: Recipe, path: str | Path) -> None:
    """Write the recipe, every default filled in, as YAML to `path`."""
    Path(path).write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
