"""peft interop, and minipeft on models it did not write.

**LoRA in peft's format.** peft stores a LoRA adapter as two files (peft ``save_pretrained``):

    adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora", ...}
    adapter_model.safetensors   base_model.model.<transformers module path>.lora_A.weight   (r, d_in)
                                base_model.model.<transformers module path>.lora_B.weight   (d_out, r)

and computes h = W0 x + s · B A x with s = lora_alpha / r (Hu et al. 2021, §4.1, Eq. 3), or s = lora_alpha / √r
with ``use_rslora`` (Kalajdzievski 2023, Eq. 6). minipeft's ``LoRALinear`` computes the same Δh = s · B (A x)
with A (r, d_in) and B (d_out, r) and the same s (``LoRAConfig.scale``), so a conversion only renames: module
paths through the backbone's two-way name map (``Backbone.hf_name`` / ``our_name``: ``layers.0.attn.q`` ↔
``encoder.layer.0.attention.self.query`` on BERT, ``model.layers.0.self_attn.q_proj`` on Llama), tensors as
they are. minipeft's own files (``save_adapter``) are named ``minipeft_adapter.*``, so both fit in one directory.

    export_peft(model, name, directory)     minipeft LoRA -> peft files (PeftModel.from_pretrained reads them)
    import_peft(model, directory, name)     peft LoRA files -> a minipeft LoRA adapter on ``model``

**peft's options.** Each field of peft's ``LoraConfig`` is honoured or refused by name (``check_peft_fields``).
A PiSSA or OLoRA adapter (``init_lora_weights="pissa"`` / ``"olora"``, saved without peft's conversion) was trained on
W0 − s·B0A0, B0 A0 taken from W0 (its SVD / QR), which peft's reload recomputes; ``import_peft`` recomputes B0, A0
the same way and imports the plain LoRA of rank 2r that computes the same, [B | B0][A; −A0], W0 left as it is.

**DoRA and IA³.** A DoRA adapter is peft's LoRA with ``use_dora=True`` and one more tensor per Linear,
``<path>.lora_magnitude_vector`` (d_out,): minipeft's ``DoRALinear.m``. An IA³ adapter is peft's ``IA3`` (one
``<path>.ia3_l`` per Linear, its side set by ``feedforward_modules``): ``export_peft`` / ``import_peft`` convert both.

Other methods have no peft equivalent here (peft has no bottleneck, Compacter or parallel adapter; its prefix
tuning keeps virtual tokens in ``past_key_values``, not in minipeft's per-layer form): exporting one is an error.

**A ``transformers`` model.** LoRA, a bottleneck adapter (``placement="modules"``) and a parallel adapter
(``placement="modules"``) attach by module name to any ``nn.Module`` (``core.add_output_delta``), a
``transformers`` BertModel or LlamaForCausalLM included; ``TransformersBackbone`` makes such a model the
``encoder`` of ``train.SequenceClassifier`` so ``minipeft.lab.train.train`` trains it (README: "Use minipeft on a
transformers model").
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from .api import _home, add_adapter, adapter_config, adapter_names, delete_adapter
from .backbones.contract import Backbone
from .core import AdapterModule, adapter_modules, match_modules
from .methods.dora import DoRAConfig, DoRALinear
from .methods.ia3 import IA3Config, IA3Vector
from .methods.lora import LoRAConfig, LoRALinear

PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModel wraps the transformers model as base_model.model
TASK_TYPES = {"bert": "FEATURE_EXTRACTION", "llama": "CAUSAL_LM"}  # which PeftModel subclass from_pretrained builds
# peft LoraConfig fields whose non-default values change what the adapter computes; minipeft's LoRA has none
UNSUPPORTED = {"bias": "none", "lora_bias": False, "fan_in_fan_out": False,
               "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
               "use_qalora": False, "target_parameters": None, "trainable_token_indices": None,
               "alora_invocation_tokens": None}
# peft LoRA variants (peft 0.21) that change what the adapter computes; set, they are refused like the above
VARIANTS = {"velora_config": None, "monteclora_config": None, "use_bdlora": None, "arrow_config": None,
            "kasa_config": None, "megatron_config": None}
# LoraConfig fields import_peft honours, or that only record how the adapter was made, stored or is run: which
# Linears got a LoRA (the weights file names each one), an init's own settings, run-time options
HONOURED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "target_modules",
            "use_dora", "exclude_modules", "layers_to_transform", "layers_pattern", "runtime_config", "megatron_core",
            "qalora_group_size", "ensure_weight_tying", "eva_config", "corda_config", "loftq_config", "lora_ga_config"}
# init_lora_weights: peft reloads these as saved (h = W0 x + s·BAx): the saved A, B are the whole adapter
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# these moved s·B0A0 out of the base weight when the adapter was made (W = W0 − s·B0A0), and peft's reload does it
# again from W0: import_peft recomputes B0, A0 from this model's weight (``initial_lora``)
BASE_CHANGING_INITS = ("pissa", "olora")
REFUSED_INITS = {  # the base-weight change of these cannot be recomputed from the files and the model
    "pissa_niter_": "its base-weight change comes from a randomized SVD (torch.svd_lowrank) that peft draws anew at "
                    "every load",
    "corda": "its base-weight change comes from calibration data (activation covariances) that is not in the files",
    "loftq": "it replaces the base weights by their quantization (LoftQ)",
    "lora_ga": "its base-weight change comes from gradients that are not in the files (peft's own reload drops it)"}
# Linears a transformers model has and minipeft's backbones do not: a short target must not land on them
HF_ONLY_LINEARS = ("pooler.dense", "lm_head")


# ---- names: minipeft's paths <-> the transformers model's ---------------------------------------------------

def _transformers_root(home: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the outermost ``transformers`` model inside ``home`` (``home`` itself if there is
    none): peft's names are relative to it."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "", home
    for path, module in home.named_modules():
        if isinstance(module, PreTrainedModel):
            return path, module
    return "", home


def _exportable(model: nn.Module, home: nn.Module, name: str, kind: type, method: str, parts: str) -> dict:
    """Path (in ``home``, the backbone) -> module of adapter ``name``'s ``kind`` modules; a ValueError when it has
    none there, or modules outside the backbone (peft's files describe the transformers model only)."""
    found = {p: m for p, m in adapter_modules(home, name).items() if isinstance(m, kind)}
    outside = sorted(set(adapter_modules(model, name)) - set(adapter_modules(home, name)))
    if outside or not found:
        raise ValueError(f"{method} {name!r} has {parts} outside the backbone ({outside[:3]}); peft's files describe "
                         f"{method} on the transformers model only")
    return found


def _namer(model: nn.Module):
    """(home, to_hf, to_ours): where the adapter lives, and the path maps between it and the transformers model.
    A minipeft backbone maps through its name table; a wrapped transformers model by its path inside ``home``."""
    home = _home(model)
    if isinstance(home, Backbone):
        if home.peft_mismatch:
            raise ValueError(f"peft's files cannot describe a LoRA on this {home.description}: "
                             f"{home.peft_mismatch}. Keep the adapter in minipeft's format (save_adapter / "
                             "load_adapter); import_peft and export_peft support the bert and llama backbones")
        return home, home.hf_name, home.our_name
    root, _ = _transformers_root(home)
    lead = root + "." if root else ""
    return home, (lambda ours: ours[len(lead):] if ours.startswith(lead) else ours), (lambda hf: lead + hf)


def _matches(path: str, target: str) -> bool:
    """peft's and minipeft's rule for a target name (peft ``check_target_module_exists``)."""
    return path == target or path.endswith("." + target)


def compact_targets(chosen: list[str], universe: list[str]) -> list[str]:
    """The shortest dotted suffixes that select exactly ``chosen`` among ``universe`` (each path's shortest
    suffix that selects nothing outside ``chosen``), e.g. ["query", "value"] for W_q, W_v of every layer."""
    chosen_set, targets = set(chosen), []
    for path in chosen:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not suffix[0].isdigit() and all(u in chosen_set for u in universe if _matches(u, suffix)):
                break
        if suffix not in targets:
            targets.append(suffix)
    return targets


def _linear_names(home: nn.Module) -> list[str]:
    inside = tuple(p + "." for p in adapter_modules(home))
    return [n for n, m in home.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, AdapterModule)
            and not n.startswith(inside)]


# ---- export -------------------------------------------------------------------------------------------------

def export_peft(model: nn.Module, name: str, directory: str | Path, base_model_name_or_path: str | None = None,
                task_type: str | None = "auto") -> Path:
    """Write LoRA adapter ``name`` as peft's ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(hf_model, directory)`` then gives the outputs of ``model`` (BertModel for
    minipeft's Encoder, LlamaForCausalLM for its Decoder; the model itself for a wrapped transformers model).
    Only LoRA has a peft equivalent; any other method raises ValueError."""
    from safetensors.torch import save_file

    config = adapter_config(model, name)
    if config.method == "prompt_tuning":  # peft's PROMPT_TUNING: its soft tokens (interop_prompt_tuning)
        from .interop_prompt_tuning import export_prompt_tuning

        return export_prompt_tuning(model, name, directory, base_model_name_or_path, task_type)
    if isinstance(config, IA3Config):
        return export_peft_ia3(model, name, directory, base_model_name_or_path, task_type)
    if not isinstance(config, LoRAConfig):
        extra = (" (peft's PREFIX_TUNING keeps its virtual tokens in past_key_values, in another form)"
                 if config.method == "prefix" else "")
        raise ValueError(f"adapter {name!r} is a {config.method!r} adapter: peft has no equivalent of it{extra}. "
                         f"export_peft writes LoRA, DoRA and IA³ adapters only; keep this one in "
                         f"minipeft's format with save_adapter(model, {name!r}, directory)")
    home, to_hf, _ = _namer(model)
    layers = _exportable(model, home, name, LoRALinear, "LoRA", "layers")
    merged = [p for p, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"LoRA {name!r} is merged into its weights (e.g. {merged[0]}): peft would add ΔW a second "
                         f"time on the pretrained weights; call unmerge_adapter(model, {name!r}) first")
    linears = {p.rsplit(".output_deltas.", 1)[0]: m for p, m in layers.items()}  # the LoRA'd Linear's path
    hf_paths = {to_hf(p): m for p, m in linears.items()}
    universe = [to_hf(n) for n in _linear_names(home)] + list(HF_ONLY_LINEARS)
    state = {}
    for path, m in hf_paths.items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.A.detach().contiguous().cpu()  # (r, d_in)
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.B.detach().contiguous().cpu()  # (d_out, r)
        if isinstance(m, DoRALinear):  # DoRA's magnitude, peft's lora_magnitude_vector (d_out,)
            state[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = m.m.detach().contiguous().cpu()
    family = getattr(home, "family", None)
    if task_type == "auto":
        task_type = TASK_TYPES.get(family)
    if base_model_name_or_path is None:
        base_model_name_or_path = _base_model_name(home)
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora,
        "target_modules": compact_targets(list(hf_paths), universe),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True, "inference_mode": True,
        **UNSUPPORTED, "use_dora": isinstance(config, DoRAConfig), "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt", "written_by": "minipeft"})
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return directory


def _base_model_name(home: nn.Module) -> str | None:
    """The checkpoint the adapter was trained on: a transformers model's ``name_or_path``, a minipeft backbone's
    checkpoint directory (its ``cfg.name`` is the config.json path or the directory's name)."""
    if isinstance(home, Backbone):
        name = str(home.cfg.name)
        return str(Path(name).parent) if name.endswith("config.json") else name
    _, root = _transformers_root(home)
    return getattr(getattr(root, "config", None), "name_or_path", None) or None


# ---- import -------------------------------------------------------------------------------------------------

def read_peft_lora(directory: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """peft's config, per transformers module path its (A, B), and with ``use_dora`` its DoRA magnitude m (d_out,);
    a clear error naming the file otherwise."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights_file = directory / PEFT_CONFIG_FILE, directory / PEFT_WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{directory} is not a saved peft adapter: expected {PEFT_CONFIG_FILE} and "
                                f"{PEFT_WEIGHTS_FILE} (a minipeft adapter is read by load_adapter)")
    try:
        cfg = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise ValueError(f"{config_file} holds a peft {kind!r} adapter; import_peft reads peft_type 'LORA' (LoRA, "
                         "DoRA), 'IA3' and 'PROMPT_TUNING' adapters")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{config_file} lacks {key!r}; a peft LoRA config has r, lora_alpha, target_modules")
    check_peft_fields(cfg, config_file)
    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # safetensors' own error types for a truncated / corrupt file
        raise ValueError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        found = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        magnitude = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?",
                                 key)
        if magnitude:
            magnitudes[magnitude.group(1)] = tensor
            continue
        if not found:
            raise ValueError(f"{weights_file} holds {key!r}, which is not a LoRA A or B matrix of a Linear "
                             f"({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight); minipeft imports plain LoRA")
        pairs.setdefault(found.group(1), {})[found.group(2)] = tensor
    half = sorted(p for p, ab in pairs.items() if len(ab) != 2)
    if half or not pairs:
        raise ValueError(f"{weights_file}: {'no LoRA tensors' if not pairs else f'A or B missing for {half[:3]}'}")
    dora = bool(cfg.get("use_dora", False))
    if set(magnitudes) != (set(pairs) if dora else set()):
        odd = sorted(set(pairs) ^ set(magnitudes)) if dora else sorted(magnitudes)
        raise ValueError(f"{weights_file} does not match use_dora={dora} in {config_file.name}: DoRA has one "
                         f"lora_magnitude_vector per LoRA'd Linear, plain LoRA none (e.g. {odd[:2]})")
    return cfg, {p: (ab["A"], ab["B"]) for p, ab in pairs.items()}, magnitudes


def check_peft_fields(cfg: dict, config_file: Path) -> None:
    """Raise, naming the file and the field, unless every field of peft's LoRA config is one import_peft honours
    (``HONOURED``, ``init_lora_weights`` in ``PLAIN_INITS`` or ``BASE_CHANGING_INITS``) or is left at its default."""
    empty = (None, False, {}, [], "")
    used = [f"{k}={cfg[k]!r}" for k, default in {**UNSUPPORTED, **VARIANTS}.items()
            if cfg.get(k, default) not in (default, *empty)]
    if used:
        raise ValueError(f"{config_file} uses {', '.join(used)}, which minipeft's LoRA does not have (it is plain "
                         f"LoRA or DoRA: one r and alpha for every layer, no bias, no extra trained modules)")
    unknown = [f"{k}={v!r}" for k, v in cfg.items() if k not in HONOURED | set(UNSUPPORTED) | set(VARIANTS)
               and v not in empty]
    if unknown:
        raise ValueError(f"{config_file} sets {', '.join(unknown)}: peft options minipeft does not know (a newer "
                         "peft?); they may change what the adapter computes, so it is not imported")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, bool) or init in PLAIN_INITS or init in BASE_CHANGING_INITS:
        return
    why = next((why for start, why in REFUSED_INITS.items() if isinstance(init, str) and init.startswith(start)),
               "minipeft does not know this init")
    raise ValueError(f"{config_file} has init_lora_weights={init!r}: {why}, so its function cannot be rebuilt. "
                     f"import_peft reads init_lora_weights {', '.join(map(repr, PLAIN_INITS))} (the saved A, B are "
                     f"the whole adapter) and {', '.join(map(repr, BASE_CHANGING_INITS))} (their change to the base "
                     "weights is recomputed from this model's weights, as peft does on load). Convert it to plain "
                     "LoRA in peft first: save_pretrained(..., path_initial_model_for_weight_conversion=...)")


def initial_lora(weight: torch.Tensor, init: str, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of a PiSSA or OLoRA adapter, computed from the pretrained weight W0 (d_out, d_in) in fp32 as peft
    does when it builds or reloads one (``LoraLayer.pissa_init`` / ``olora_init``); peft then sets the base weight
    to W0 − s·B0A0, so that the adapter starts as a no-op.

        PiSSA (Meng et al. 2024, §3):   W0 = U S Vᵀ,  B0 = U_r (S_r/s)^½,  A0 = (S_r/s)^½ V_rᵀ  (s·B0A0 = U_r S_r V_rᵀ)
        OLoRA (Büyükakyüz 2024, §3):    W0 = Q R,     B0 = Q_{:, :r},     A0 = R_{:r, :}
    """
    w = weight.detach().float()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        root = torch.diag(torch.sqrt(S[:r] / scale))  # (r, r)
        return root @ Vh[:r], U[:, :r] @ root  # A0 (r, d_in), B0 (d_out, r)
    Q, R = torch.linalg.qr(w)  # (d_out, k), (k, d_in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def as_plain_lora(A, B, A0, B0) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain LoRA of rank 2r for an adapter trained on W0 − s·B0A0 (peft ``subtract_mutated_init``):
    (W0 − s·B0A0) + s·BA = W0 + s·[B | B0] [A; −A0], so the base weight stays W0."""
    return torch.cat([A, -A0.to(A.dtype)]), torch.cat([B, B0.to(B.dtype)], dim=1)  # (2r, d_in), (d_out, 2r)


def import_peft(model: nn.Module, directory: str | Path, name: str | None = None) -> LoRAConfig:
    """Attach the peft LoRA in ``directory`` to ``model`` as minipeft adapter ``name`` (default "default").

    The adapter must have been made on this model's checkpoint (the same transformers module paths and Linear
    shapes); otherwise, or for any peft feature plain LoRA lacks, a ValueError names the file and the model is
    left exactly as it was."""
    if _is_prompt_tuning(directory):  # peft's PROMPT_TUNING: its soft tokens (interop_prompt_tuning)
        from .interop_prompt_tuning import import_prompt_tuning

        return import_prompt_tuning(model, directory, name)
    home, _, to_ours = _namer(model)  # first: a backbone peft cannot describe is refused whatever the files
    directory = Path(directory)
    if _peft_type(directory) == "IA3":
        return import_peft_ia3(model, directory, name)
    cfg, pairs, magnitudes = read_peft_lora(directory)
    weights_file = directory / PEFT_WEIGHTS_FILE
    name = name or "default"
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} already exists in this model; existing: {adapter_names(model)}")
    linears = dict(home.named_modules())
    base = cfg.get("base_model_name_or_path")
    found, problems = {}, []
    for hf_path, (A, B) in pairs.items():
        ours = _our_linear(hf_path, to_ours, linears)
        if ours is None:
            problems.append(f"no Linear {hf_path!r} in this model")
            continue
        linear = linears[ours]
        want_a, want_b = (cfg["r"], linear.in_features), (linear.out_features, cfg["r"])
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            problems.append(f"{hf_path}: A {tuple(A.shape)}, B {tuple(B.shape)} where this model's Linear with "
                            f"r={cfg['r']} needs A {want_a}, B {want_b}")
        if hf_path in magnitudes and tuple(magnitudes[hf_path].shape) != (linear.out_features,):
            problems.append(f"{hf_path}: DoRA magnitude {tuple(magnitudes[hf_path].shape)} where this model's "
                            f"Linear needs ({linear.out_features},)")
        found[ours] = (A, B)
        if hf_path in magnitudes:
            magnitudes[ours] = magnitudes.pop(hf_path)
    if problems:
        raise ValueError(f"{weights_file} does not fit this model (made on {base!r}?; {len(problems)} problems): "
                         + "; ".join(problems[:4]))
    order = {path: i for i, path in enumerate(linears)}
    found = dict(sorted(found.items(), key=lambda item: order[item[0]]))  # the model's order, not the file's
    targets = compact_targets(list(found), _linear_names(home))
    if set(match_modules(home, targets, nn.Linear)) != set(found):  # regex-like targets: use the exact paths
        targets = sorted(found)
    init = cfg.get("init_lora_weights", True)
    try:
        kind = DoRAConfig if magnitudes else LoRAConfig  # DoRA: LoRA's fields and a magnitude per output feature
        config = kind(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                            targets=targets, rslora=bool(cfg.get("use_rslora", False)),
                            init="gaussian" if init == "gaussian" else "kaiming")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / PEFT_CONFIG_FILE}: {e}") from None
    if init in BASE_CHANGING_INITS:
        config, found = _without_base_change(config, found, init, linears, directory)
    add_adapter(home, config, name)
    try:
        with torch.no_grad():
            for ours, (A, B) in found.items():
                lora = linears[ours].output_deltas[name]
                lora.A.copy_(A)
                lora.B.copy_(B)
                if ours in magnitudes:
                    lora.m.copy_(magnitudes[ours])
    except Exception:
        delete_adapter(home, name)
        raise
    return config


def _is_prompt_tuning(directory) -> bool:
    """Whether ``directory`` holds a peft prompt-tuning adapter (its config's peft_type)."""
    try:
        return json.loads((Path(directory) / PEFT_CONFIG_FILE).read_text()).get("peft_type") == "PROMPT_TUNING"
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object: the LoRA reader says why
        return False


def _without_base_change(config: LoRAConfig, found: dict, init: str, linears: dict, directory: Path):
    """A PiSSA / OLoRA adapter as the plain LoRA of rank 2r that computes what peft's reload computes (in eval mode;
    ``as_plain_lora``), its s = α/r (α/√r) kept: α doubles (× √2 with rsLoRA), as in peft's own conversion."""
    merged = [p for p in found if any(getattr(d, "merged", False) for d in getattr(linears[p], "output_deltas", {})
                                      .values())]
    if merged:
        raise ValueError(f"{directory / PEFT_CONFIG_FILE} has init_lora_weights={init!r}, which is defined on the "
                         f"pretrained weights, but {merged[0]} has a LoRA merged into its weight: unmerge it first")
    plain = {}
    for path, (A, B) in found.items():
        A0, B0 = initial_lora(linears[path].weight, init, config.r, config.scale)
        plain[path] = as_plain_lora(A, B, A0, B0)
    alpha = config.alpha * (math.sqrt(2) if config.rslora else 2)
    return type(config)(r=2 * config.r, alpha=alpha, dropout=config.dropout, targets=config.targets,
                        rslora=config.rslora, init=config.init), plain


def _our_linear(hf_path: str, to_ours, modules: dict) -> str | None:
    """Our path of the Linear peft calls ``hf_path`` (also under a task model's ``bert.`` / ``model.`` lead)."""
    candidates = [hf_path]
    head, _, rest = hf_path.partition(".")
    if head in ("bert", "roberta") and rest:
        candidates.append(rest)
    for candidate in candidates:
        ours = to_ours(candidate)
        if isinstance(modules.get(ours), nn.Linear) and not isinstance(modules.get(ours), AdapterModule):
            return ours
    return None


# ---- IA³ in peft's format ------------------------------------------------------------------------------------
# peft stores an IA³ adapter (peft_type "IA3") as one vector per Linear, base_model.model.<path>.ia3_l: (d_out, 1)
# on a Linear whose output it rescales, (1, d_in) on one in ``feedforward_modules``, whose input it rescales
# (peft ``IA3Layer``); minipeft's ``IA3Vector`` holds the same l as a (width,) vector on the same side.

IA3_HONOURED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "target_modules", "feedforward_modules", "exclude_modules", "init_ia3_weights"}
IA3_UNSUPPORTED = {"fan_in_fan_out": False, "modules_to_save": None}


def _peft_type(directory: Path) -> str | None:
    """The ``peft_type`` of a saved peft adapter (None if its config cannot be read: the reader says why)."""
    try:
        return json.loads((directory / PEFT_CONFIG_FILE).read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def export_peft_ia3(model: nn.Module, name: str, directory: str | Path, base_model_name_or_path: str | None = None,
                    task_type: str | None = "auto") -> Path:
    """Write IA³ adapter ``name`` as peft's files (``export_peft`` calls it for an IA³ adapter)."""
    from safetensors.torch import save_file

    home, to_hf, _ = _namer(model)
    vectors = _exportable(model, home, name, IA3Vector, "IA³", "vectors")
    linear_of = {p: re.sub(r"\.(output|input)_deltas\.[^.]+$", "", p) for p in vectors}
    universe = [to_hf(n) for n in _linear_names(home)] + list(HF_ONLY_LINEARS)
    state, outputs, inputs = {}, [], []
    for path, m in vectors.items():
        hf = to_hf(linear_of[path])
        l = m.l.detach().contiguous().cpu()
        state[f"{PEFT_PREFIX}{hf}.ia3_l"] = l[:, None] if m.side == "output" else l[None, :]  # peft's shapes
        (outputs if m.side == "output" else inputs).append(hf)
    feedforward = compact_targets(inputs, universe) if inputs else []
    if task_type == "auto":
        task_type = TASK_TYPES.get(getattr(home, "family", None))
    peft_config = {  # feedforward_modules ⊆ target_modules, as peft's IA3Config requires
        "peft_type": "IA3", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or _base_model_name(home),
        "target_modules": (compact_targets(outputs, universe) if outputs else []) + feedforward,
        "feedforward_modules": feedforward, "init_ia3_weights": True, "inference_mode": True,
        **IA3_UNSUPPORTED, "exclude_modules": None, "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt", "written_by": "minipeft"})
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return directory


def _is_feedforward(hf_path: str, feedforward) -> bool:
    """peft's rule (``IA3Model._check_target_module_feedforward``): a regex string fully matches, or the path ends
    with one of the listed names."""
    if isinstance(feedforward, str):
        return bool(re.fullmatch(feedforward, hf_path))
    return any(hf_path.endswith(f) for f in feedforward or [])


def read_peft_ia3(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """peft's IA³ config and, per transformers module path, its ia3_l; a clear error naming the file otherwise."""
    from safetensors.torch import load_file

    config_file, weights_file = directory / PEFT_CONFIG_FILE, directory / PEFT_WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{directory} is not a saved peft adapter: expected {PEFT_WEIGHTS_FILE}")
    cfg = json.loads(config_file.read_text())
    empty = (None, False, {}, [], "")
    used = [f"{k}={cfg[k]!r}" for k, default in IA3_UNSUPPORTED.items() if cfg.get(k, default) not in
            (default, *empty)]
    unknown = [f"{k}={v!r}" for k, v in cfg.items() if k not in IA3_HONOURED | set(IA3_UNSUPPORTED)
               and v not in empty]
    if used or unknown:
        raise ValueError(f"{config_file} sets {', '.join(used + unknown)}: minipeft's IA³ is one vector per Linear "
                         "(no extra trained modules, nn.Linear weights); it is not imported")
    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # safetensors' own error types for a truncated / corrupt file
        raise ValueError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    vectors = {}
    for key, tensor in tensors.items():
        found = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.ia3_l(?:\.default)?", key)
        if not found:
            raise ValueError(f"{weights_file} holds {key!r}, which is not an IA³ vector of a Linear "
                             f"({PEFT_PREFIX}<module>.ia3_l)")
        vectors[found.group(1)] = tensor
    if not vectors:
        raise ValueError(f"{weights_file}: no IA³ vectors")
    return cfg, vectors


def import_peft_ia3(model: nn.Module, directory: str | Path, name: str | None = None) -> IA3Config:
    """Attach the peft IA³ adapter in ``directory`` to ``model`` as minipeft adapter ``name`` (``import_peft`` calls
    it for peft_type "IA3"). A vector on a feedforward module rescales its Linear's input, any other its output, as
    peft decides it from ``feedforward_modules``; a file that does not fit the model is a ValueError naming it, and
    the model is left exactly as it was."""
    home, _, to_ours = _namer(model)
    directory = Path(directory)
    cfg, vectors = read_peft_ia3(directory)
    name = name or "default"
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} already exists in this model; existing: {adapter_names(model)}")
    linears = dict(home.named_modules())
    found, inputs, problems = {}, set(), []
    for hf_path, l in vectors.items():
        ours = _our_linear(hf_path, to_ours, linears)
        if ours is None:
            problems.append(f"no Linear {hf_path!r} in this model")
            continue
        linear, feedforward = linears[ours], _is_feedforward(hf_path, cfg.get("feedforward_modules"))
        want = (1, linear.in_features) if feedforward else (linear.out_features, 1)
        if tuple(l.shape) != want:
            problems.append(f"{hf_path}: ia3_l {tuple(l.shape)} where this model's Linear needs {want} (rescaling "
                            f"its {'input: a feedforward module' if feedforward else 'output'})")
        found[ours] = l.reshape(-1)
        if feedforward:
            inputs.add(ours)
    if problems:
        base = cfg.get("base_model_name_or_path")
        raise ValueError(f"{directory / PEFT_WEIGHTS_FILE} does not fit this model (made on {base!r}?; "
                         f"{len(problems)} problems): " + "; ".join(problems[:4]))
    universe = _linear_names(home)
    outputs = [p for p in universe if p in found and p not in inputs]
    ins = [p for p in universe if p in inputs]
    feedforward = compact_targets(ins, universe) if ins else []
    config = IA3Config(targets=(compact_targets(outputs, universe) if outputs else []) + feedforward,
                       feedforward=feedforward)
    placed = {p: side for p, (_, side) in config.placements(home).items()}
    if placed != {p: "input" if p in inputs else "output" for p in found}:  # regex-like names: the exact paths
        config = IA3Config(targets=outputs + ins, feedforward=ins)
    add_adapter(home, config, name)
    try:
        with torch.no_grad():
            for path, l in found.items():
                sites = linears[path].input_deltas if path in inputs else linears[path].output_deltas
                sites[name].l.copy_(l)
    except Exception:
        delete_adapter(home, name)
        raise
    return config


# ---- a transformers model as the encoder of train.SequenceClassifier -------------------------------------------

class TransformersBackbone(nn.Module):
    """Wrap a ``transformers`` model (BertModel, LlamaForCausalLM, ...) so ``SequenceClassifier`` and
    ``minipeft.lab.train.train`` use it: ``forward(input_ids, attention_mask, token_type_ids)`` returns its base
    model's last hidden states (B, T, d) (a causal LM's head is skipped); ``hidden_size`` its width. The wrapped
    model is ``.model``, so its module names (``query``, ``q_proj``, ``mlp``...) are what adapters target.
    ``train`` tokenizes with the model's own tokenizer: ``tokenizer=``, else the one in its checkpoint directory
    (``config.name_or_path``; ``tokenizer_dir``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "config") or not hasattr(model.config, "hidden_size"):
            raise TypeError(f"TransformersBackbone wraps a transformers model (with .config.hidden_size), "
                            f"got {type(model).__name__}")
        self.model = model
        self.hidden_size = model.config.hidden_size

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        base = getattr(self.model, "base_model", self.model)  # LlamaModel inside LlamaForCausalLM; BertModel itself
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return base(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # (B, T, d)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def tokenizer_dir(encoder: nn.Module) -> str | None:
    """The checkpoint directory of the tokenizer ``encoder`` reads (``train`` loads it when given no ``tokenizer=``):
    the directory its weights came from when it holds a tokenizer (a minipeft backbone's, a wrapped transformers
    model's ``name_or_path``); for minipeft's own backbones made from a config, their family's asset (None: MiniLM's,
    ``assets.load_tokenizer``; SmolLM2's for the Decoder). Any other model: a ValueError asking for ``tokenizer=``,
    never another model's tokenizer."""
    if isinstance(encoder, TransformersBackbone):
        home, kind = encoder.model, type(encoder.model).__name__
    elif isinstance(encoder, Backbone):
        home, kind = encoder, type(encoder).__name__
    else:
        raise ValueError(f"train() cannot tell which tokenizer a {type(encoder).__name__} encoder reads; pass its "
                         "own: train(model, task, lr, tokenizer=...)")
    checkpoint = _base_model_name(home)
    if checkpoint and any((Path(checkpoint) / f).is_file() for f in TOKENIZER_FILES):
        return str(checkpoint)
    if isinstance(encoder, Backbone) and encoder.family in ("bert", "llama"):
        from .backbones.decoder import checkpoint_dir

        return None if encoder.family == "bert" else str(checkpoint_dir())
    raise ValueError(f"train() needs the tokenizer of this {kind}, and its checkpoint ({checkpoint!r}) is not "
                     "a local directory with tokenizer files; pass it: train(model, task, lr, "
                     "tokenizer=AutoTokenizer.from_pretrained(...)) (another model's tokenizer would feed it ids "
                     "it never learned)")
