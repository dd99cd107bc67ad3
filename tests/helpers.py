"""Small helpers shared by the method tests (fixtures live in conftest.py).

``TOL``, the one tolerance of every numerical-equality test on model outputs. Two fp32 computations of the same
function differ by rounding: the unit roundoff is u = 2⁻²⁴ ≈ 6e-8, and a dot product of length K summed in
another order (blocked or fused GEMMs, another CPU's SIMD width, another thread count) differs by up to ≈ K·u
times the sum of |terms| (Higham 2002, §3.1). Our hidden states pass ~15 GEMMs of K ≤ 1536 with entries of
order 1-10: ≈ 1e-5 was seen between two machines, so the bound is 1e-4 on the largest difference at real tokens.
A real bug (a dropped scale, a missing residual, a wrong mask) moves outputs by ≥ 1e-2: far above it (the tests
``test_tolerance_catches_*`` show it).
"""
import torch

TOL = 1e-4


def run(model, batch):
    """The model's output on a tokenised batch, without gradients."""
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def padded_tokens(cfg, length: int, pads, left: bool = True, seed: int = 1) -> dict:
    """Random tokens of a tiny config (seeded), row i padded by ``pads[i]`` positions: on the left, as generate pads
    a decoder's prompts, or on the right; padding holds ``cfg.pad_token_id`` where the config has one."""
    torch.manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (len(pads), length))
    position = torch.arange(length)[None]  # (1, T)
    n = torch.tensor(pads)[:, None]  # (B, 1)
    mask = (position >= n if left else position < length - n).long()  # 1 = a real token
    pad = getattr(cfg, "pad_token_id", None)
    return {"input_ids": ids if pad is None else ids.masked_fill(mask == 0, pad), "attention_mask": mask}


def gap(a, b, mask=None) -> float:
    """Largest |a − b| over real tokens (``mask`` (B, T), 1 = real; None = everywhere)."""
    diff = (a - b).abs()
    return float((diff[mask.bool()] if mask is not None else diff).max())


def perturb(model, name: str | None = None, scale: float = 0.05, seed: int = 3):
    """Move adapter parameters (of adapter ``name``, or all) off their init, seeded: many start at Δh = 0, and a
    test of a formula must see non-trivial tensors."""
    torch.manual_seed(seed)
    places = (f".{name}.",) if name else (".deltas.", ".output_deltas.", "prefixes.")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in places):
                p.add_(scale * torch.randn_like(p))


def state(model):
    """A detached copy of the model's state dict (to check what changed)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def structure(model):
    """Everything that makes a model what it is: the module tree (names and types), every forward hook and
    pre-hook, the state dict (names, values), ``requires_grad`` and ``training`` flags, and any adapter configs."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "configs": {n: dict(m.__dict__.get("adapter_configs", {})) for n, m in model.named_modules()
                    if m.__dict__.get("adapter_configs")},
    }


def assert_unchanged(model, before):
    """The model is structurally identical to ``before = structure(model)``: nothing added, left or changed."""
    after = structure(model)
    for key in ("modules", "hooks", "grad", "training", "configs"):
        assert after[key] == before[key], f"the model's {key} changed"
    assert after["state"].keys() == before["state"].keys(), "the model's state dict keys changed"
    changed = [k for k, v in after["state"].items() if not torch.equal(v, before["state"][k])]
    assert not changed, f"tensors changed: {changed[:5]}"


def notebook_functions(name: str, folder: str, functions, prelude: str = "import math\nimport torch") -> dict:
    """An exercise's functions as the notebook ``folder/name`` (solutions/ or exercises/) defines them: every code
    cell that defines one of ``functions``, executed together after ``prelude`` (one may call another)."""
    import nbformat

    from minipeft.course.exercises import ROOT

    nb = nbformat.read(ROOT / folder / name, as_version=4)
    sources = [c.source for c in nb.cells if c.cell_type == "code"
               and any(c.source.lstrip().startswith(f"def {f}(") for f in functions)]
    namespace = {}
    exec(prelude + "\n" + "\n\n".join(sources), namespace)  # noqa: S102
    return {f: namespace[f] for f in functions}


# ---- the conformance suite: one example table, keyed by the method registry's names ---------------------------

from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402


@dataclass(frozen=True)
class Example:
    """A method's config as the conformance suite attaches it to any backbone. ``counts(backbone)``: its closed
    form (trained, stored) in the backbone's d, L and key/value width w (None: the method offers none);
    ``sources``: how many trained, frozen adapters it reads (AdapterFusion), attached first as s0, s1, ..."""
    config: Callable[[], object]
    counts: Callable[[object], tuple[int, int]] | None = None
    sources: int = 0


def _dims(backbone):
    return backbone.hidden_size, backbone.num_layers, backbone.attention.kv_width


def _same(count):
    """A closed form for a method whose trained parameters are all stored."""
    return lambda backbone: (count(*_dims(backbone)),) * 2


def _lora_qv(r):
    """LoRA on the query and value projections (their roles on every backbone): L·r(d + d) + L·r(d + w)."""
    from minipeft.methods.lora import lora_count

    return lambda d, L, w: lora_count(r, d, d, num_layers=L) + lora_count(r, d, w, num_layers=L)


def _examples() -> dict[str, dict[str, Example]]:
    from minipeft import (BottleneckConfig, CompacterConfig, CompacterPPConfig, FusionConfig, LoRAConfig,
                          ParallelAdapterConfig, PHMAdapterConfig, PrefixConfig, ScaledParallelAdapterConfig)
    from minipeft.methods.bottleneck import houlsby_count, pfeiffer_count
    from minipeft.methods.compacter import compacter_count, phm_adapter_count
    from minipeft.methods.composite import CompositeConfig
    from minipeft.methods.fusion import fusion_count
    from minipeft.methods.mam import MAMConfig, mam_stored_count
    from minipeft.methods.parallel import parallel_count
    from minipeft.methods.prefix import prefix_stored_count, prefix_training_count

    def prefix_counts(d, L, w):
        return prefix_training_count(d, L, 3, 16, kv_width=w), prefix_stored_count(w, L, 3)

    def mam_counts(d, L, w):
        return (prefix_training_count(d, L, 3, 16, kv_width=w) + parallel_count(d, L, d // 8),
                mam_stored_count(d, L, 3, d // 8, kv_width=w))

    return {
        "bottleneck": {
            "houlsby": Example(lambda: BottleneckConfig(bottleneck=8), _same(lambda d, L, w: houlsby_count(d, L, 8))),
            "pfeiffer": Example(lambda: BottleneckConfig(placement="pfeiffer", bottleneck=8),
                                _same(lambda d, L, w: pfeiffer_count(d, L, 8)))},
        "phm_adapter": {"phm": Example(lambda: PHMAdapterConfig(bottleneck=8, n=4),
                                       _same(lambda d, L, w: phm_adapter_count(d, L, 8, 4)))},
        "compacter": {"compacter": Example(lambda: CompacterConfig(bottleneck=8, n=4),
                                           _same(lambda d, L, w: compacter_count(d, L, 8, 4)))},
        "compacter_pp": {"compacter_pp": Example(lambda: CompacterPPConfig(bottleneck=8, n=4),
                                                 _same(lambda d, L, w: compacter_count(d, L, 8, 4, sites=1)))},
        "composite": {
            "adapter_lora": Example(lambda: CompositeConfig({"adapter": BottleneckConfig(placement="pfeiffer",
                                                                                         bottleneck=8),
                                                             "lora": LoRAConfig(r=2)}),
                                    _same(lambda d, L, w: pfeiffer_count(d, L, 8) + _lora_qv(2)(d, L, w))),
            "gated": Example(lambda: CompositeConfig({"lora": LoRAConfig(r=2), "prefix": PrefixConfig(length=3,
                                                                                                        hidden=8)},
                                                     gated=True))},
        "fusion": {"fusion": Example(lambda: FusionConfig(adapters=["s0", "s1"]),
                                     _same(lambda d, L, w: fusion_count(d, L)), sources=2)},
        "lora": {"lora": Example(lambda: LoRAConfig(r=4), _same(_lora_qv(4)))},
        "parallel": {
            "ffn": Example(lambda: ParallelAdapterConfig(r=8), _same(lambda d, L, w: parallel_count(d, L, 8))),
            "both": Example(lambda: ParallelAdapterConfig(r=8, placement="both"),
                            _same(lambda d, L, w: parallel_count(d, L, 8, sites=2)))},
        "scaled_parallel": {"learned": Example(lambda: ScaledParallelAdapterConfig(r=8, scale="learned"),
                                               _same(lambda d, L, w: parallel_count(d, L, 8, learned=True)))},
        "prefix": {
            "reparameterized": Example(lambda: PrefixConfig(length=3, hidden=16),
                                       lambda backbone: prefix_counts(*_dims(backbone))),
            "flat": Example(lambda: PrefixConfig(length=3, reparameterize=False),
                            _same(lambda d, L, w: prefix_stored_count(w, L, 3)))},
        "mam": {"mam": Example(lambda: MAMConfig(length=3, hidden=16, reduction_factor=8),
                               lambda backbone: mam_counts(*_dims(backbone)))},
    }


EXAMPLES = _examples()


def _hf_twins() -> dict:
    """Family -> (a tiny random transformers model of it, its output comparable to ours): for peft equality."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    def bert():
        return BertModel(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=96, max_position_embeddings=64), add_pooling_layer=False)

    def llama():
        return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64))

    return {"bert": (bert, lambda out: out.last_hidden_state, lambda model, h: h),
            "llama": (llama, lambda out: out.logits, lambda model, h: model.logits(h))}


HF_TWINS = _hf_twins()
