"""The backbone's config as stage two reads it, without importing ``transformers``.

Importing ``transformers`` costs ~0.8 s of CPU (its lazy module table scans every model package),
paid by every cached `lst train`, `lst sweep`, `lst fisher` and sweep worker, none of which builds
a Hugging Face model. Stage two only reads plain attributes of the config: widths, head counts,
dropouts, activation names and norm epsilons. So `lst extract` stores the config whole
(``to_dict()`` with the class defaults filled in) together with the class's ``attribute_map``
(T5's ``hidden_size`` is ``d_model``), and stage two rebuilds a plain object from it.

Packs written before this store only the values that differ from the defaults; ``read_packed``
returns None for them, and the caller falls back to ``AutoConfig``.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["BackboneConfig", "packed_config_json", "read_packed", "FULL_KEY", "MAP_KEY"]

FULL_KEY = "lst_full_config"  # config.json holds every attribute, defaults included
MAP_KEY = "lst_attribute_map"  # the config class's attribute aliases


def packed_config_json(config: Any) -> str:
    """``config`` (a transformers PretrainedConfig) as the init pack stores it: whole, with its
    aliases. ``AutoConfig.for_model(**data)`` still rebuilds the same config from it."""
    data = json.loads(config.to_json_string(use_diff=False))
    data.pop("_name_or_path", None)  # where this machine loaded it from: no part of the shape
    data[FULL_KEY] = True
    data[MAP_KEY] = dict(getattr(type(config), "attribute_map", None) or {})
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


class BackboneConfig:
    """A plain stand-in for a ``PretrainedConfig``: its attributes, its aliases both ways (as
    ``PretrainedConfig.__getattribute__``/``__setattr__``), ``to_dict`` and deep copies."""

    def __init__(self, data: dict, attribute_map: dict[str, str] | None = None) -> None:
        object.__setattr__(self, "attribute_map", dict(attribute_map or {}))
        for k, v in data.items():
            setattr(self, k, v)

    def __getattr__(self, name: str) -> Any:  # only reached when the attribute is not set
        alias = self.__dict__.get("attribute_map", {}).get(name)
        if alias is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self, alias)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, self.__dict__.get("attribute_map", {}).get(name, name), value)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "attribute_map"}

    def __repr__(self) -> str:
        return f"BackboneConfig({self.__dict__.get('model_type')!r}, {len(self.__dict__) - 1} attributes)"


def read_packed(data: dict) -> BackboneConfig | None:
    """The config of a pack's ``config.json`` content, or None for a pack that stored only the
    non-default values (read it through ``AutoConfig``)."""
    if not data.get(FULL_KEY):
        return None
    data = dict(data)
    data.pop(FULL_KEY)
    return BackboneConfig(data, data.pop(MAP_KEY, None))
