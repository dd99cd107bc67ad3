"""The registry of backbones: a new backbone is one file that registers itself here.

Keys are backbone *families* ("bert", "llama", "gpt2"): the family is what ``Backbone.identity()`` records in a
saved adapter and what loading checks, so one name means the same thing everywhere. A checkpoint (MiniLM,
SmolLM2) is an entry's default ``asset``, not its key: one class loads every checkpoint of its family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BackboneEntry:
    """family; the class (a ``contract.Backbone`` with ``from_hf``); ``tiny()`` a small random config for tests;
    ``asset`` the offline checkpoint ``cls.from_pretrained()`` loads by default (None: none ships);
    ``tokenizer(path=None)`` that checkpoint's tokenizer, loaded lazily (transformers is imported only when called)."""
    family: str
    cls: type
    tiny: Callable[[], object]
    asset: str | None
    tokenizer: Callable


REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    if entry.family != entry.cls.family:
        raise ValueError(f"backbone entry {entry.family!r} names a class of family {entry.cls.family!r}")
    if entry.family in REGISTRY and REGISTRY[entry.family].cls is not entry.cls:
        raise ValueError(f"backbone family {entry.family!r} is already registered ({REGISTRY[entry.family].cls})")
    REGISTRY[entry.family] = entry
    return entry


def get_backbone(family: str) -> BackboneEntry:
    if family not in REGISTRY:
        raise KeyError(f"unknown backbone {family!r}; registered backbones: {sorted(REGISTRY)}")
    return REGISTRY[family]
