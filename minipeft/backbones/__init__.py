"""Backbones: the contract every one offers the methods (``contract``), and the registry, filled by each
backbone's own file: ``REGISTRY["bert"]`` (Encoder, MiniLM), ``["llama"]`` (Decoder, SmolLM2), ``["gpt2"]``."""
from . import decoder, encoder, gpt2  # noqa: F401  (each registers itself)
from .registry import REGISTRY, BackboneEntry, get_backbone, register_backbone  # noqa: F401
