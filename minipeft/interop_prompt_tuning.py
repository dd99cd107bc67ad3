"""Prompt tuning in peft's format (``export_peft`` / ``import_peft`` call these for a prompt-tuning adapter).

peft's ``PromptTuningConfig`` stores its soft tokens as one tensor and a config (peft ``save_pretrained``):

    adapter_config.json         {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": l, "token_dim": d,
                                 "num_transformer_submodules": 1, "prompt_tuning_init": ..., ...}
    adapter_model.safetensors   prompt_embeddings   (l, d)

and its model reads [P; X_e] with the virtual tokens at positions 0..l-1, the real ones at l..l+n-1 (Lester et al.
2021, §2): what minipeft's ``SoftPrompt`` computes (``Backbone.prepend_prompts``), so a conversion copies P. peft
numbers positions by place in the padded array (its ``position_ids`` are ignored for prompt learning), minipeft by
real tokens only: the two agree on unpadded and right-padded inputs; with left padding peft's real tokens sit
further from its virtual ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .api import _home, add_adapter, adapter_config, adapter_names, delete_adapter
from .backbones.contract import Backbone
from .methods.prompt_tuning import PromptTuningConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
WEIGHTS_KEY = "prompt_embeddings"
TASK_TYPES = {"bert": "FEATURE_EXTRACTION", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM"}
# PromptTuningConfig fields that only record how P was initialised or how peft runs it: the saved P is the adapter
RECORD_ONLY = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
               "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
               "num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
               "tokenizer_name_or_path", "tokenizer_kwargs", "modules_to_save"}


def backbone_of(model: nn.Module) -> Backbone:
    home = _home(model)
    if not isinstance(home, Backbone):
        raise ValueError("prompt tuning in peft's format converts adapters of minipeft backbones (Encoder, Decoder, "
                         f"GPT2), got {type(home).__name__}")
    return home


def export_prompt_tuning(model: nn.Module, name: str, directory: str | Path, base_model_name_or_path: str | None,
                         task_type: str | None = "auto") -> Path:
    """Write prompt-tuning adapter ``name`` as peft's files; ``PeftModel.from_pretrained(hf_model, directory)`` then
    gives our outputs at the real tokens (its outputs hold the l virtual positions first)."""
    from safetensors.torch import save_file

    config, home = adapter_config(model, name), backbone_of(model)
    prompt = home.prompts[name].weight.detach().contiguous().cpu()  # (l, d)
    if task_type == "auto":
        task_type = TASK_TYPES.get(home.family)
    peft_config = {
        "peft_type": "PROMPT_TUNING", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": config.length, "token_dim": home.hidden_size, "num_transformer_submodules": 1,
        "num_attention_heads": home.attention.num_heads, "num_layers": home.num_layers,
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "inference_mode": True, "revision": None, "modules_to_save": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({WEIGHTS_KEY: prompt}, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "written_by": "minipeft"})
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return directory


def import_prompt_tuning(model: nn.Module, directory: str | Path, name: str | None = None) -> PromptTuningConfig:
    """Attach the peft prompt-tuning adapter in ``directory`` as minipeft adapter ``name`` (default "default"); a
    ValueError naming the file (and the model unchanged) when it does not fit this backbone."""
    from safetensors.torch import load_file

    home, directory = backbone_of(model), Path(directory)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    cfg = json.loads(config_file.read_text())
    unknown = sorted(k for k, v in cfg.items() if k not in RECORD_ONLY and v not in (None, {}, []))
    if unknown:
        raise ValueError(f"{config_file} sets {unknown}, which minipeft's prompt tuning does not have")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{config_file} has num_transformer_submodules={cfg['num_transformer_submodules']} (soft "
                         "tokens for an encoder-decoder's two stacks); minipeft's backbones have one")
    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # safetensors' own error types, or no file
        raise ValueError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    l, d = cfg.get("num_virtual_tokens"), home.hidden_size
    prompt = tensors.get(WEIGHTS_KEY)
    if set(tensors) != {WEIGHTS_KEY} or prompt is None or tuple(prompt.shape) != (l, d):
        raise ValueError(f"{weights_file} holds {[(k, tuple(v.shape)) for k, v in tensors.items()]}; this "
                         f"{home.description} needs one {WEIGHTS_KEY!r} of shape (num_virtual_tokens, d) = ({l}, {d})")
    name = name or "default"
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} already exists in this model; existing: {adapter_names(model)}")
    try:
        config = PromptTuningConfig(length=l, init="random")  # P is copied from the file below
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_file}: {e}") from None
    add_adapter(home, config, name)
    try:
        with torch.no_grad():
            home.prompts[name].weight.copy_(prompt)
    except Exception:
        delete_adapter(home, name)
        raise
    return config
