"""docs/configuration.md names every key the config accepts.

The keys are read off the config model itself (core/config.py), so a key added there
without a line in the reference fails here.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from core.config import Config

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
#: Set by the loader of the config file, never written in it.
NOT_KEYS = {"base_dir"}


def _models_in(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """(path suffix, model) for the models a field's type holds: ``""`` for the model
    itself or an optional one, ``.<name>`` for a dict of them, ``[]`` for a tuple."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    if origin is dict:
        return [(".<name>" + s, m) for s, m in _models_in(typing.get_args(annotation)[1])]
    if origin is tuple:
        return [("[]" + s, m) for s, m in _models_in(typing.get_args(annotation)[0])]
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        found = []
        for arg in typing.get_args(annotation):
            found += _models_in(arg)
        return found
    return []


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, type[BaseModel]]:
    """Every key path (``server.port``, ``lists.<name>.kind``), with the model it is in.

    A model reached a second time (``trunk_groups.<name>.auth`` after ``auth``) adds only
    its own path: its keys are the ones already listed.
    """
    keys: dict[str, type[BaseModel]] = {}
    seen: set[type[BaseModel]] = set()

    def walk(current: type[BaseModel], at: str) -> None:
        seen.add(current)
        for name, field in current.model_fields.items():
            if name in NOT_KEYS:
                continue
            path = f"{at}{name}"
            keys[path] = current
            for suffix, inner in _models_in(field.annotation):
                if inner in seen:
                    continue
                walk(inner, f"{path}{suffix}.".replace("[].", "[]."))

    walk(model, prefix)
    return keys


def documented(path: str, text: str) -> bool:
    """Whether ``path`` stands in back-quotes in the reference; a rule's key (``rules[].x``)
    is documented by its own name in the rules section."""
    if "[]." in path:
        path = path.rsplit("[].", 1)[1]
    return re.search(rf"`{re.escape(path)}`", text) is not None


def test_every_config_key_is_in_docs_configuration_md() -> None:
    text = DOC.read_text()
    keys = config_keys()
    assert "server.port" in keys and "lists.<name>.kind" in keys and "admin.tokens_env" in keys
    # Sections (``admin``, ``lists``) are documented through their keys.
    leaves = [p for p in keys if not any(k.startswith((p + ".", p + "[")) for k in keys)]
    missing = sorted(path for path in leaves if not documented(path, text))
    assert missing == [], f"keys missing from {DOC.name}: {missing}"


def test_the_walk_sees_nested_and_repeated_models() -> None:
    keys = config_keys()
    assert "policies.<name>.rules[].window_s" in keys
    assert "trunk_groups.<name>.auth" in keys and "auth.secret_env" in keys
    assert "trunk_groups.<name>.auth.secret_env" not in keys  # listed once, as auth.*
    assert not documented("lists.<name>.no_such_key", DOC.read_text())
