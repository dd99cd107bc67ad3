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


# ---- the conformance suite: every registered method on every registered backbone ---------------------------

def build(family):
    """The family's tiny random backbone, seeded: two calls give the same weights."""
    from minipeft.backbones import REGISTRY

    torch.manual_seed(0)
    entry = REGISTRY[family]
    return entry.cls(entry.tiny()).eval()


def tiny_batch(model):
    """Random tokens padded to three lengths: on the right for an encoder, on the left for a decoder (a KV cache,
    ``new_cache``), as generate pads its prompts."""
    return padded_tokens(model.cfg, 10, (0, 4, 7), left=hasattr(model, "new_cache"))


def with_sources(family, ex):
    """The backbone with the trained (perturbed), frozen adapters the example reads (fusion), else bare."""
    from minipeft import BottleneckConfig, add_adapter, freeze_adapters

    model = build(family)
    for i in range(ex.sources):
        add_adapter(model, BottleneckConfig(placement="pfeiffer", bottleneck=8), f"s{i}")
    if ex.sources:
        perturb(model, seed=5)
        freeze_adapters(model, *[f"s{i}" for i in range(ex.sources)])
    return model



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


def twins(family):
    """(transformers model, our backbone on the same weights, a padded batch, how to read each one's output)."""
    from minipeft.backbones import REGISTRY

    make, hf_output, our_output = HF_TWINS[family]
    torch.manual_seed(0)
    hf = make().eval()
    ours = REGISTRY[family].cls.from_hf(hf)
    return hf, ours, tiny_batch(ours), hf_output, our_output


def twin_outputs(hf, ours, batch, hf_output, our_output):
    """(ours, transformers') outputs on ``batch``, without gradients."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        return our_output(ours, ours(ids, mask)), hf_output(hf(input_ids=ids, attention_mask=mask))
