"""minipeft.quant (Dettmers et al. 2023, QLoRA §3): NF4 and double quantization equal to bitsandbytes 0.50 on the
CPU (the same packed codes, constants and dequantized values, bit for bit, on MiniLM's and SmolLM2's weights and
random ones), the frozen 4-bit Linear, and QLoRA (LoRA on every linear of a 4-bit Llama-family decoder) equal to
LoRA on the dequantized fp32 decoder. The QLoRA tests use a small random decoder of the same class: quantizing all
of SmolLM2 takes about 10 s and each forward dequantizes its 106 M weights again, minutes for the three tests."""
import copy

import pytest
import torch

from minipeft import LoRAConfig, add_adapter, merge_adapter, train_adapter
from minipeft import quant as Q
from minipeft.core import EXAMPLES
from minipeft.backbones.decoder import Decoder, DecoderConfig
from helpers import assert_unchanged, padded_tokens, perturb, structure

# every method's example configs, as the conformance suite's (fusion's read source adapters: covered there)
CONFIGS = {f"{method}-{label}": ex.config for method, labels in EXAMPLES.items() for label, ex in labels.items()
           if not ex.sources and "llama" not in getattr(ex, "refuses", {})}  # (BitFit refuses the bias-free Llama)

LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]
# 128·200 weights in gate/up/down = 400 blocks of 64: two 2nd-level blocks of 256, the last one partial
SMALL = DecoderConfig(vocab_size=300, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=200, max_position=64, name="small-llama (random)")
RANDOM_SHAPES = [(7,), (65,), (3, 5, 7), (129, 1), (1000, 33), (2 * 64 * 256 + 5,)]  # the last: 513 blocks of 64


def bnb():
    """bitsandbytes.functional (a dev dependency); the comparisons skip only where it is not installed."""
    return pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module")
def smollm2():
    return Decoder.from_pretrained()


@pytest.fixture(scope="module")
def weights(minilm, smollm2):
    """Real pretrained matrices, and random ones whose sizes are not multiples of the blocks."""
    torch.manual_seed(0)
    attn0, ffn0 = smollm2.sites("attn")[0].linears(), smollm2.sites("ffn")[0].linears()
    real = {"minilm.q": minilm.sites("attn")[0].linears()["q"].weight, "smollm2.k": attn0["k"].weight,
            "smollm2.gate": ffn0["gate"].weight, "smollm2.down": ffn0["down"].weight}
    random = {f"random {shape}": 0.05 * torch.randn(shape) for shape in RANDOM_SHAPES}
    zeros = 0.05 * torch.randn(10, 64)
    zeros[3] = 0  # an all-zero block: absmax 0
    return {**{k: v.detach() for k, v in real.items()}, **random, "a zero block": zeros}


def bnb_quantize(w, double_quant):
    """bitsandbytes' packed codes, quantization state and dequantized tensor for ``w``."""
    F = bnb()
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)
    return packed, state, F.dequantize_4bit(packed, state, quant_type="nf4")


def assert_equal_to_bnb(w, double_quant):
    packed, state, w_bnb = bnb_quantize(w, double_quant)
    ours = Q.quantize_nf4(w, double_quant)
    differ = int((ours["codes"] != packed.view(-1)).sum())
    assert torch.equal(ours["codes"], packed.view(-1)), f"{differ} bytes of packed codes differ"
    if double_quant:
        assert torch.equal(ours["absmax_codes"], state.absmax)  # c₁ − mean in 8 bits
        assert torch.equal(ours["absmax_scale"], state.state2.absmax)  # one per 256 blocks
        assert torch.equal(ours["absmax_offset"], state.offset)  # the mean
    else:
        assert torch.equal(ours["absmax"], state.absmax)
    delta = float((Q.dequantize_nf4(ours, w.shape) - w_bnb).abs().max())
    assert delta == 0.0, f"dequantized values differ from bitsandbytes': max |Δ| = {delta:.3g}"


# ---- the two code tables ---------------------------------------------------------------------------------------

def test_nf4_levels_are_the_asymmetric_normal_quantiles():
    q = Q.NF4
    assert q.shape == (16,) and bool((q[1:] > q[:-1]).all())
    assert q[0] == -1 and q[-1] == 1 and q[7] == 0  # exact 0 (§3): 7 negative levels, 8 positive
    # positive levels: Φ⁻¹ at 9 evenly spaced probabilities from the offset to ½ (½ dropped), scaled by Φ⁻¹(offset)
    normal = torch.distributions.Normal(0.0, 1.0)
    p = normal.cdf(q[8:].double() * normal.icdf(torch.tensor(Q.NF4_OFFSET, dtype=torch.float64)))
    assert torch.allclose(p, torch.linspace(Q.NF4_OFFSET, 0.5, 9)[:-1].flip(0).double(), atol=1e-6)


def test_nf4_levels_equal_bitsandbytes_table():
    """Derived from Φ⁻¹ here, hard-coded there: the same 16 float32 numbers."""
    assert torch.equal(Q.NF4, bnb().get_4bit_type("nf4", device="cpu"))


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(Q.DYNAMIC, bnb().create_dynamic_map())


# ---- 4-bit codes, constants and values equal to bitsandbytes ---------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("name", ["minilm.q", "smollm2.k", "smollm2.gate", "smollm2.down", "a zero block"]
                         + [f"random {shape}" for shape in RANDOM_SHAPES])
def test_equal_to_bitsandbytes(weights, name, double_quant):
    assert_equal_to_bnb(weights[name], double_quant)


def test_every_linear_of_a_minilm_block_equal_to_bitsandbytes(minilm):
    for site in (minilm.sites("attn")[3], minilm.sites("ffn")[3]):
        for linear in site.linears().values():
            assert_equal_to_bnb(linear.weight.detach(), double_quant=True)


def test_nearest_level_by_value_ties_to_the_lower_and_high_nibble_first():
    """u exactly on the midpoint of two levels takes the lower; one float above it, the upper. The first value of
    a pair is the byte's high nibble."""
    mids = (Q.NF4[:-1] + Q.NF4[1:]) / 2
    above = torch.nextafter(mids, torch.tensor(2.0))
    w = torch.cat([torch.ones(1), torch.stack([mids, above], 1).reshape(-1)[:-1]])  # absmax 1: u = w exactly
    nibbles = torch.stack([Q.quantize_nf4(w, False)["codes"] >> 4, Q.quantize_nf4(w, False)["codes"] & 15], 1)
    expected = torch.cat([torch.tensor([15]), torch.stack([torch.arange(15), torch.arange(1, 16)], 1).reshape(-1)])
    assert torch.equal(nibbles.reshape(-1)[:30].long(), expected[:30])
    assert_equal_to_bnb(w, double_quant=False)


def test_second_level_uses_bitsandbytes_grid_rule():
    """bitsandbytes 0.50's CPU kernel rounds u to one of 65,536 grid points before taking the nearest level: near
    a midpoint of the dynamic map that can give the farther level. Ours follows it (plain nearest would not)."""
    torch.manual_seed(0)
    x = torch.cat([torch.ones(1), (torch.rand(20_000) * 2 - 1) ** 3])
    codes, absmax = Q.quantize_blockwise_8bit(x, Q.DYNAMIC)
    bnb_codes, state = bnb().quantize_blockwise(x, code=bnb().create_dynamic_map(), blocksize=256)
    assert torch.equal(codes, bnb_codes) and torch.equal(absmax, state.absmax)
    u = x / absmax.repeat_interleave(256)[: x.numel()]
    nearest = (u[:, None] - Q.DYNAMIC).abs().argmin(1)
    assert (nearest != codes).any(), "the test needs values where the grid rule and plain nearest disagree"


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="inf or NaN"):
        Q.quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="floating-point"):
        Q.quantize_nf4(torch.arange(8))
    with pytest.raises(ValueError, match="block size"):
        Q.quantize_nf4(torch.randn(8), size=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        Q.Linear4bit(torch.nn.Conv1d(2, 2, 1))


# ---- bytes per parameter ---------------------------------------------------------------------------------------

@pytest.fixture
def small():
    torch.manual_seed(0)
    return Decoder(SMALL).eval()


@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_per_parameter_closed_form(minilm, smollm2, small, double_quant):
    """Stored bytes = the closed form, per layer; per parameter 0.5 + 4/64 without double quantization and
    0.5 + 1/64 + 4/(64·256) with it (+ 4 bytes for the mean, per tensor)."""
    linears = [minilm.sites("ffn")[0].linears()["ffn_in"], smollm2.sites("ffn")[0].linears()["down"]]
    model = Q.quantize_linears(small, double_quant)
    layers = [Q.Linear4bit(m, double_quant) for m in linears] + [m for m in model.modules()
                                                               if isinstance(m, Q.Linear4bit)]
    assert len(layers) == 2 + 2 * 7
    for m in layers:
        assert m.nbytes() == Q.nf4_nbytes(m.in_features * m.out_features, double_quant)
    n = 64 * 256 * 9  # a multiple of 64·256: every block and 2nd-level block full
    per_parameter = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    assert Q.nf4_nbytes(n, double_quant) == n * per_parameter + 4 * double_quant
    assert per_parameter <= Q.bytes_per_parameter(model) < per_parameter + 2e-3


# ---- the 4-bit Linear ------------------------------------------------------------------------------------------

def test_linear4bit_is_a_frozen_linear(minilm):
    linear = minilm.sites("ffn")[0].linears()["ffn_in"]
    layer = Q.Linear4bit(linear)
    assert isinstance(layer, torch.nn.Linear) and (layer.in_features, layer.out_features) == (384, 1536)
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and layer.bias is linear.bias
    assert {n for n, _ in layer.named_buffers()} == {"codes", "absmax_codes", "absmax_scale", "absmax_offset"}
    x = torch.randn(2, 5, 384)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, linear.bias))
    # the quantization error: at most half the widest level gap (0.3038) times the block's absmax
    w = linear.weight.detach()
    assert float((layer.weight - w).abs().max()) < 0.16 * float(w.abs().max())
    before = structure(layer)
    with pytest.raises(RuntimeError, match="dequantize_linears"):
        layer.weight = torch.zeros(1536, 384)
    assert_unchanged(layer, before)


def test_quantize_twice_or_after_an_adapter_is_refused_unchanged(small):
    model = Q.quantize_linears(copy.deepcopy(small))
    before = structure(model)
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_linears(model)
    assert_unchanged(model, before)
    model = add_adapter(small, LoRAConfig(targets=["q"]), "a")
    before = structure(model)
    with pytest.raises(ValueError, match="quantize before adding adapters"):
        Q.quantize_linears(model)
    assert_unchanged(model, before)


# ---- QLoRA on a decoder ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokens():
    return padded_tokens(SMALL, 12, (0, 4, 9))


@pytest.fixture
def qlora(small):
    """The decoder in NF4 (double quantization) with LoRA r=8 on all 7 linears of every block, B moved off 0."""
    model = Q.quantize_linears(copy.deepcopy(small))
    add_adapter(model, LoRAConfig(r=8, alpha=16, targets=LINEARS), "a")
    perturb(model, "a", scale=0.05)
    return model


def logits(model, batch):
    return model.logits(model(batch["input_ids"], batch["attention_mask"]))


def relative_gap(a, b, batch):
    """max |a − b| / max |b| at real tokens."""
    real = batch["attention_mask"].bool()
    return float((a - b)[real].abs().max() / b[real].abs().max())


def test_qlora_equals_lora_on_the_dequantized_decoder(qlora, small, tokens):
    """The same LoRA on the fp32 decoder whose linears hold the dequantized weights: the same logits."""
    reference = Q.dequantize_linears(copy.deepcopy(qlora))
    assert not any(isinstance(m, Q.Linear4bit) for m in reference.modules())
    with torch.no_grad():
        ours, ref, base = logits(qlora, tokens), logits(reference, tokens), logits(small, tokens)
    assert relative_gap(ours, ref, tokens) <= 1e-5
    assert relative_gap(ours, base, tokens) > 1e-2  # quantization and LoRA change the logits


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_attaches_to_the_4bit_decoder_unchanged(small, tokens, method):
    """Linear4bit is an nn.Linear to the backbone contract: each method, seeded alike, computes on the 4-bit
    decoder exactly what it computes on the fp32 decoder holding the dequantized weights."""
    outputs = []
    for dequantize in (False, True):
        model = Q.quantize_linears(copy.deepcopy(small))
        if dequantize:
            Q.dequantize_linears(model)
        torch.manual_seed(5)
        add_adapter(model, CONFIGS[method](), "a")
        perturb(model, "a")
        with torch.no_grad():
            outputs.append(model(tokens["input_ids"], tokens["attention_mask"]))
    assert torch.equal(*outputs)


def test_qlora_trains_only_lora(qlora, tokens):
    train_adapter(qlora, "a")
    trainable = {n for n, p in qlora.named_parameters() if p.requires_grad}
    assert all(".output_deltas.a." in n and n.rsplit(".", 1)[1] in ("A", "B") for n in trainable)
    assert len(trainable) == 2 * len(LINEARS) * SMALL.num_layers
    frozen = {k: v.clone() for k, v in qlora.state_dict().items() if ".output_deltas." not in k}
    qlora.train()
    logits(qlora, tokens)[tokens["attention_mask"].bool()].logsumexp(-1).mean().backward()
    torch.optim.SGD([p for p in qlora.parameters() if p.requires_grad], lr=0.1).step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qlora.parameters() if p.requires_grad)
    assert all(torch.equal(v, qlora.state_dict()[k]) for k, v in frozen.items())  # 4-bit codes, constants, rest


def test_merging_into_4_bits_is_refused_then_merges_after_dequantizing(qlora, tokens):
    before = structure(qlora)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        merge_adapter(qlora, "a")
    assert_unchanged(qlora, before)
    with torch.no_grad():
        unmerged = logits(qlora, tokens)
        Q.dequantize_linears(qlora)  # in place: LoRA stays attached to the same (now fp32) layers
        assert torch.equal(logits(qlora, tokens), unmerged)
        merge_adapter(qlora, "a")
        assert relative_gap(logits(qlora, tokens), unmerged, tokens) < 1e-5


def lora_grads(model, batch):
    train_adapter(model, "a")
    model.train()
    logits(model, batch)[batch["attention_mask"].bool()].logsumexp(-1).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_gradients_equal_lora_on_the_dequantized_decoder(qlora, tokens):
    """The 4-bit backward (W dequantized again, ∂L/∂x = ∂L/∂y · W) gives LoRA the gradients plain autograd gives
    on the fp32 decoder holding the same weights. Same matmuls in the same order: equal up to fp32 rounding of
    differently blocked kernels (relative 1e-5, far below TOL)."""
    reference = Q.dequantize_linears(copy.deepcopy(qlora))
    ours, ref = lora_grads(qlora, tokens), lora_grads(reference, tokens)
    assert ours.keys() == ref.keys() and len(ours) == 2 * len(LINEARS) * SMALL.num_layers
    for name in ours:
        scale = float(ref[name].abs().max())
        assert scale > 0 and float((ours[name] - ref[name]).abs().max()) <= 1e-5 * scale, name


def test_backward_keeps_no_dequantized_weight(qlora, tokens):
    """What autograd saves for the backward holds no (d_out, d_in) fp32 weight: the 4-bit state is all that stays
    (QLoRA's memory saving during training; plain autograd would keep each dequantized W until the backward)."""
    shapes = {(m.out_features, m.in_features) for m in qlora.modules() if isinstance(m, Q.Linear4bit)}
    train_adapter(qlora, "a")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logits(qlora, tokens).sum().backward()
    assert saved and not shapes & set(saved)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logits(Q.dequantize_linears(qlora), tokens).sum()  # the check can fail: fp32 Linears save their W
    assert shapes & set(saved)


def test_4bit_linear_backward_with_a_trained_bias(minilm):
    """Bias and input gradients through the 4-bit Linear equal those of F.linear on its dequantized weight."""
    layer = Q.Linear4bit(copy.deepcopy(minilm.sites("ffn")[0].linears()["ffn_in"]))
    layer.bias.requires_grad_(True)
    weight, x = layer.weight, torch.randn(2, 5, 384)

    def grads(forward):
        x_ = x.clone().requires_grad_(True)
        layer.bias.grad = None
        (forward(x_) ** 2).sum().backward()
        return x_.grad, layer.bias.grad

    ours, ref = grads(layer), grads(lambda t: torch.nn.functional.linear(t, weight, layer.bias))
    for a, b in zip(ours, ref):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_qlora_recipe_trains_lora_on_every_block_linear(small):
    """The registered recipe: NF4 linears, LoRA r=8 on all 7 of each block (Σ r(d_in + d_out)), only LoRA
    trained; the parameter summary counts the 4-bit weights in the backbone."""
    from minipeft.api import apply_recipe, parameter_summary
    from minipeft.core import get_recipe

    model = apply_recipe(small.requires_grad_(False), get_recipe("qlora"))
    layers = [m for m in model.modules() if isinstance(m, Q.Linear4bit)]
    assert len(layers) == len(LINEARS) * SMALL.num_layers
    expected = sum(8 * (m.in_features + m.out_features) for m in layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    summary = parameter_summary(model, "qlora")
    assert summary.adapter == expected and summary.backbone == model.bare_parameter_count()
