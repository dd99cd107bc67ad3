"""peft interop (minipeft LoRA <-> peft LoRA on transformers' BertModel / LlamaForCausalLM) and minipeft's adapters
on transformers models, trained with ``minipeft.lab.train``. Real weights (MiniLM, SmolLM2-135M), real tokens.

Tolerance. The issue asks the same outputs within 1e-5 across the two libraries. That is tighter than ``TOL`` (1e-4,
tests/helpers.py: what two machines' fp32 GEMMs may differ by over ~15 layers) and holds because both sides run in one
process, on one machine, with one thread count: what differs is only the order of a few fp32 operations.
- Encoder (hidden states of order 1-10): minipeft's Encoder and BertModel sum a few products in another order,
  ≈ 2e-6 measured: absolute 1e-5.
- Decoder (logits up to ≈ 30, final hidden states up to ≈ 57: SmolLM2 has outlier features): the Decoder follows
  LlamaForCausalLM's op order, so with a scale that is a power of two the outputs are bit-identical (the export test).
  Otherwise the one difference is where the scale s multiplies: peft computes (B A x)·s, minipeft B (s·A x) (cheaper,
  on the r-wide intermediate); that is one rounding (≤ 1 ulp) per LoRA output, which 30 layers carry to ≈ 7e-5 on
  logits of ≈ 30 (≈ 2e-6 of their scale). So the decoder's bound is 1e-5 *relative to the largest logit*. IA³ is
  the same case: peft computes l ⊙ h, minipeft h + (l − 1) ⊙ h (its Δh form), one rounding per element.
A dropped scale (α/r vs α/√r), a swapped A/B or a LoRA on the wrong layer moves outputs by ≥ 1e-2 of their scale
(each test also checks the adapter moves outputs by > 100 × the tolerance).
Run ``python tests/test_interop.py`` to print the measured differences.
"""
import copy
import json

import pytest
import torch
from helpers import TOL, assert_unchanged, gap, perturb, structure
from safetensors.torch import load_file, save_file

from minipeft import BottleneckConfig, LoRAConfig, ParallelAdapterConfig, PrefixConfig, add_adapter, train_adapter
from minipeft.backbones.encoder import Encoder
from minipeft.methods.dora import DoRAConfig
from minipeft.methods.ia3 import IA3Config
from minipeft.api import CONFIG_FILE, LEGACY_CONFIG_FILE, LEGACY_WEIGHTS_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from minipeft.assets import minilm_path
from minipeft.backbones.decoder import Decoder, checkpoint_dir, load_decoder_tokenizer
from minipeft.interop import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TransformersBackbone, export_peft, import_peft

INTEROP_TOL = 1e-5  # see the module docstring: same process, same machine, same thread count


# ---- fixtures: the transformers models, real tokens --------------------------------------------------------

def hf_bert():
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()


def hf_llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(checkpoint_dir()), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2():
    return Decoder.from_pretrained()


def headlines():
    """Three real BBC headlines, left-padded (as generation pads), with the position ids the decoder uses."""
    from minipeft.lab.tasks import load_task

    tok = load_decoder_tokenizer()
    tok.padding_side = "left"
    b = tok(list(load_task("topic", max_test=3)["test"]["text"]), padding=True, return_tensors="pt")
    b["position_ids"] = (b["attention_mask"].cumsum(1) - 1).clamp(min=0)  # real tokens at 0..n-1 in both
    return b


@pytest.fixture(scope="module")
def heads():
    return headlines()


def bert_out(hf, batch):
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def enc_out(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def llama_logits(hf, b):
    with torch.no_grad():
        return hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits


def dec_logits(decoder, b):
    with torch.no_grad():
        return decoder.logits(decoder(b["input_ids"], b["attention_mask"]))


def peft_lora(hf, tmp_path, **config):
    """A peft LoRA made with peft itself on ``hf``, saved; B initialised non-zero so it changes outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(hf, LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(str(tmp_path))
    return peft_model.eval()


# ---- export: minipeft -> peft ------------------------------------------------------------------------------

def export_gap_encoder(model, batch, tmp_path):
    from peft import PeftModel

    add_adapter(model, LoRAConfig(r=4, alpha=7, targets=["q", "v", "ffn_out"]), "a")  # α/r = 1.75
    perturb(model, "a")
    export_peft(model, "a", tmp_path)
    hf = hf_bert()
    base = bert_out(hf, batch)
    theirs = bert_out(PeftModel.from_pretrained(hf, str(tmp_path)).eval(), batch)
    ours, real = enc_out(model, batch), batch["attention_mask"]
    return gap(ours, theirs, real), gap(ours, base, real)


def test_export_encoder_lora_loads_in_peft(model, batch, tmp_path):
    diff, moved = export_gap_encoder(model, batch, tmp_path)
    assert diff < INTEROP_TOL and moved > 100 * INTEROP_TOL
    cfg = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 7
    assert cfg["target_modules"][:2] == ["query", "value"]  # FFN out needs per-layer names ("output.dense" is ambiguous)
    keys = load_file(str(tmp_path / PEFT_WEIGHTS_FILE))
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys and len(keys) == 6 * 3 * 2


def export_gap_decoder(smollm2, heads, tmp_path):
    from peft import PeftModel

    mine = Decoder.from_pretrained()  # cheaper than a deep copy (safetensors are memory-mapped)
    add_adapter(mine, LoRAConfig(r=4, alpha=8, rslora=True, targets=["q", "v", "down"]), "a")  # α/√r = 4: exact
    perturb(mine, "a")
    export_peft(mine, "a", tmp_path)
    hf = hf_llama()
    base = llama_logits(hf, heads)
    theirs = llama_logits(PeftModel.from_pretrained(hf, str(tmp_path)).eval(), heads)
    ours, real = dec_logits(mine, heads), heads["attention_mask"]
    return gap(ours, theirs, real), gap(ours, base, real), float(ours[real.bool()].abs().max())


def test_export_decoder_lora_loads_in_peft(smollm2, heads, tmp_path):
    diff, moved, _ = export_gap_decoder(smollm2, heads, tmp_path)
    assert diff < INTEROP_TOL and moved > 100 * INTEROP_TOL  # a power-of-two scale: bit-identical (measured 0)
    cfg = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert cfg["use_rslora"] and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]


# ---- import: peft -> minipeft ------------------------------------------------------------------------------

def import_gap_encoder(model, batch, tmp_path):
    theirs = bert_out(peft_lora(hf_bert(), tmp_path, r=3, lora_alpha=5, target_modules=["query", "value"]), batch)
    config = import_peft(model, tmp_path, "p")
    assert config.targets == ["q", "v"] and config.scale == 5 / 3
    ours = enc_out(model, batch)
    return gap(ours, theirs, batch["attention_mask"]), gap(ours, bert_out(hf_bert(), batch), batch["attention_mask"])


def test_import_peft_lora_into_encoder(model, batch, tmp_path):
    diff, moved = import_gap_encoder(model, batch, tmp_path)
    assert diff < INTEROP_TOL and moved > 100 * INTEROP_TOL


def import_gap_decoder(smollm2, heads, tmp_path):
    peft_model = peft_lora(hf_llama(), tmp_path, r=4, lora_alpha=10, use_rslora=True,
                           target_modules=["k_proj", "o_proj", "gate_proj"])
    theirs = llama_logits(peft_model, heads)
    mine = Decoder.from_pretrained()  # cheaper than a deep copy (safetensors are memory-mapped)
    config = import_peft(mine, tmp_path)
    assert config.targets == ["k", "o", "gate"] and config.rslora and config.scale == 5.0  # 10/√4
    ours, real = dec_logits(mine, heads), heads["attention_mask"]
    return gap(ours, theirs, real), gap(ours, dec_logits(smollm2, heads), real), float(ours[real.bool()].abs().max())


def test_import_peft_lora_into_decoder(smollm2, heads, tmp_path):
    diff, moved, size = import_gap_decoder(smollm2, heads, tmp_path)
    assert diff < INTEROP_TOL * size and moved > 100 * INTEROP_TOL * size  # relative to the largest logit


def test_round_trip_is_exact_and_files_do_not_collide(model, minilm, batch, tmp_path):
    add_adapter(model, LoRAConfig(r=2, alpha=3, targets=["k", "o"]), "a")
    perturb(model, "a")
    save_adapter(model, "a", tmp_path)  # minipeft's own files, next to peft's in the same directory
    export_peft(model, "a", tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE}
    a, b = copy.deepcopy(minilm), copy.deepcopy(minilm)
    import_peft(a, tmp_path, "a")
    load_adapter(b, tmp_path)
    assert torch.equal(enc_out(a, batch), enc_out(model, batch)) and torch.equal(enc_out(b, batch), enc_out(model, batch))


def test_load_adapter_reads_the_legacy_file_names(model, minilm, batch, tmp_path):
    """Directories saved before the rename (adapter_config.json in minipeft's schema + adapter.safetensors)."""
    add_adapter(model, BottleneckConfig(bottleneck=4, init_std=0.1), "old")
    save_adapter(model, "old", tmp_path)
    (tmp_path / CONFIG_FILE).rename(tmp_path / LEGACY_CONFIG_FILE)
    (tmp_path / WEIGHTS_FILE).rename(tmp_path / LEGACY_WEIGHTS_FILE)
    fresh = copy.deepcopy(minilm)
    load_adapter(fresh, tmp_path)
    assert torch.equal(enc_out(fresh, batch), enc_out(model, batch))


# ---- bad input: a clear error naming the file, the model left exactly as it was ----------------------------

@pytest.mark.parametrize("config,words", [
    (BottleneckConfig(bottleneck=4), ["'bottleneck'", "peft has no equivalent", "LoRA", "save_adapter"]),
    (ParallelAdapterConfig(r=4), ["'parallel'", "peft has no equivalent"]),
    (PrefixConfig(length=2), ["'prefix'", "peft has no equivalent", "past_key_values"])])
def test_export_other_methods_is_a_clear_error(model, tmp_path, config, words):
    add_adapter(model, config, "x")
    with pytest.raises(ValueError) as info:
        export_peft(model, "x", tmp_path)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A real peft LoRA (query, value, r=4) saved by peft on transformers' BertModel."""
    d = tmp_path_factory.mktemp("peft")
    peft_lora(hf_bert(), d, r=4, lora_alpha=8, target_modules=["query", "value"])
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / PEFT_CONFIG_FILE).read_text())
    (d / PEFT_CONFIG_FILE).write_text(json.dumps({**cfg, **changes}))


def _edit_weights(d, edit):
    state = load_file(str(d / PEFT_WEIGHTS_FILE))
    save_file(edit(state), str(d / PEFT_WEIGHTS_FILE))


LLAMA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
BAD = {
    "another peft type": (lambda d: _edit_config(d, peft_type="LOHA"), "holds a peft 'LOHA' adapter"),
    "DoRA without magnitudes": (lambda d: _edit_config(d, use_dora=True),
                                "does not match use_dora=True .* one lora_magnitude_vector per LoRA'd Linear"),
    "an IA³ config over LoRA's": (lambda d: _edit_config(d, peft_type="IA3", feedforward_modules=[]),
                                  "minipeft's IA³ is one vector per Linear"),
    "a head to save": (lambda d: _edit_config(d, modules_to_save=["classifier"]), "modules_to_save"),
    "another rank": (lambda d: _edit_config(d, r=8), r"does not fit this model .* r=8 needs A \(8, 384\)"),
    "another base model (Llama)": (lambda d: _edit_weights(d, lambda s: {
        LLAMA_KEY.format("A"): torch.zeros(4, 576), LLAMA_KEY.format("B"): torch.zeros(576, 4)}),
        r"no Linear 'model.layers.0.self_attn.q_proj' in this model"),
    "another hidden size": (lambda d: _edit_weights(d, lambda s: {k: torch.zeros(*(
        768 if n == 384 else n for n in v.shape)) for k, v in s.items()}), r"A \(4, 768\), B \(768, 4\) where"),
    "a target minipeft cannot map": (lambda d: _edit_weights(d, lambda s: {**s, **{
        f"base_model.model.pooler.dense.lora_{x}.weight": torch.zeros(*sh) for x, sh in (("A", (4, 384)),
                                                                                         ("B", (384, 4)))}}),
        "no Linear 'pooler.dense'"),
    "an embedding LoRA": (lambda d: _edit_weights(d, lambda s: {
        **s, "base_model.model.embeddings.word_embeddings.lora_embedding_A": torch.zeros(4, 10)}),
        "not a LoRA A or B matrix of a Linear"),
    "half a pair": (lambda d: _edit_weights(d, lambda s: {k: v for k, v in s.items() if "layer.3.attention.self"
                                                          ".value.lora_B" not in k}), "A or B missing"),
    "not JSON": (lambda d: (d / PEFT_CONFIG_FILE).write_text("{nope"), "is not valid JSON"),
    "corrupt weights": (lambda d: (d / PEFT_WEIGHTS_FILE).write_bytes(b"\0" * 40), "not a readable safetensors"),
}


def assert_import_refused(model, directory, message):
    """import_peft(model, directory) is a ValueError matching ``message`` that names the file; the model is as it was."""
    before = structure(model)
    with pytest.raises(ValueError, match=message) as info:
        import_peft(model, directory)
    assert str(directory) in str(info.value), "the error names the file"
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_peft_input_is_a_clear_error_and_changes_nothing(model, peft_dir, tmp_path, case):
    import shutil

    d = tmp_path / "adapter"
    shutil.copytree(peft_dir, d)
    spoil, message = BAD[case]
    spoil(d)
    assert_import_refused(model, d, message)


def test_import_under_an_existing_name_changes_nothing(model, peft_dir):
    add_adapter(model, LoRAConfig(r=2), "p")
    before = structure(model)
    with pytest.raises(ValueError, match="already exists"):
        import_peft(model, peft_dir, "p")
    assert_unchanged(model, before)


# ---- DoRA and IA³: round trips with peft on the real checkpoints -------------------------------------------------

@pytest.mark.parametrize("config", [DoRAConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"]), IA3Config()],
                         ids=["dora", "ia3"])
def test_dora_and_ia3_round_trip_with_peft_on_minilm(model, batch, tmp_path, config):
    """ours -> peft's files -> peft on transformers' BertModel: our outputs; peft's files -> import_peft: the same."""
    from peft import PeftModel

    add_adapter(model, config, "a")
    perturb(model, "a", scale=0.1)
    export_peft(model, "a", tmp_path)
    theirs = PeftModel.from_pretrained(hf_bert(), str(tmp_path)).eval()
    ours, real = enc_out(model, batch), batch["attention_mask"]
    assert gap(ours, bert_out(theirs, batch), real) < INTEROP_TOL
    assert gap(ours, bert_out(hf_bert(), batch), real) > 100 * INTEROP_TOL
    theirs.save_pretrained(str(tmp_path / "again"))  # peft's own files, read back into a fresh encoder
    fresh = Encoder.from_pretrained()
    imported = import_peft(fresh, tmp_path / "again", "b")
    assert type(imported) is type(config)
    assert gap(enc_out(fresh, batch), ours, real) < INTEROP_TOL


def test_ia3_on_smollm2_exported_to_peft(heads, tmp_path):
    from peft import PeftModel

    mine = Decoder.from_pretrained()
    add_adapter(mine, IA3Config(), "a")  # l_k, l_v, l_ff: peft's Llama default (k_proj, v_proj, down_proj)
    perturb(mine, "a", scale=0.1)
    export_peft(mine, "a", tmp_path)
    cfg = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    assert sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    ours, real = dec_logits(mine, heads), heads["attention_mask"]
    theirs = llama_logits(PeftModel.from_pretrained(hf_llama(), str(tmp_path)).eval(), heads)
    size = float(ours[real.bool()].abs().max())
    print(f"IA³ SmolLM2: ours -> peft max |Δ| = {gap(ours, theirs, real):.2e} (largest logit {size:.1f})")
    assert gap(ours, theirs, real) < INTEROP_TOL * size  # relative to the largest logit (module docstring)


IA3_BAD = {
    "a vector on the wrong side": (lambda d: _edit_config(d, feedforward_modules=[]), r"ia3_l \(1, 1536\) where"),
    "fan_in_fan_out": (lambda d: _edit_config(d, fan_in_fan_out=True), "fan_in_fan_out=True"),
    "a head to save": (lambda d: _edit_config(d, modules_to_save=["classifier"]), "modules_to_save"),
    "another model": (lambda d: _edit_weights(d, lambda s: {"base_model.model.model.layers.0.mlp.down_proj.ia3_l":
                                                            torch.ones(1, 1536)}), "no Linear 'model.layers.0"),
}


@pytest.mark.parametrize("case", list(IA3_BAD))
def test_bad_peft_ia3_input_is_a_clear_error_and_changes_nothing(model, tmp_path, case):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    d = tmp_path / "adapter"
    get_peft_model(hf_bert(), PeftIA3Config()).save_pretrained(str(d))
    spoil, message = IA3_BAD[case]
    spoil(d)
    assert_import_refused(model, d, message)


# ---- minipeft's adapters on transformers models, trained with minipeft.lab.train ------------------------------------

def test_lora_on_transformers_bert_equals_lora_on_encoder(model, batch):
    hf = hf_bert()
    add_adapter(model, LoRAConfig(r=4, alpha=8, targets=["q", "v"]), "a")
    add_adapter(hf, LoRAConfig(r=4, alpha=8, targets=["query", "value"]), "a")
    perturb(model, "a")
    with torch.no_grad():
        for path, lora in model.named_modules():
            if path.endswith("output_deltas.a"):
                linear = model.hf_name(path.rsplit(".output_deltas.", 1)[0])
                hf.get_submodule(linear).output_deltas["a"].load_state_dict(lora.state_dict())
    assert gap(enc_out(model, batch), bert_out(hf, batch), batch["attention_mask"]) < TOL


@pytest.mark.parametrize("kind,ours,theirs", [
    # Llama's mlp block reads x = RMSNorm(r) and returns h: exactly the FFN site (He et al. 2022's best placement)
    ("ffn", ParallelAdapterConfig(r=8, placement="ffn"), ParallelAdapterConfig(r=8, placement="modules",
                                                                               targets=["mlp"])),
    # self_attn is called with hidden_states=... and returns (h, weights): x by keyword, Δh on the tuple's h
    ("attn", ParallelAdapterConfig(r=8, placement="attn"), ParallelAdapterConfig(r=8, placement="modules",
                                                                                 targets=["self_attn"]))])
def test_parallel_adapter_on_transformers_llama_equals_decoder_sites(smollm2, heads, kind, ours, theirs):
    mine, hf = Decoder.from_pretrained(), hf_llama()
    add_adapter(mine, ours, "a")
    add_adapter(hf, theirs, "a")
    perturb(mine, "a")
    for site, (path, adapter) in zip(mine.sites(kind), [(p, m) for p, m in hf.named_modules()
                                                        if p.endswith("output_deltas.a")]):
        adapter.load_state_dict(site.deltas["a"].state_dict())
    real = heads["attention_mask"]
    assert gap(dec_logits(mine, heads), llama_logits(hf, heads), real) < TOL
    assert gap(dec_logits(mine, heads), dec_logits(smollm2, heads), real) > 100 * TOL


TINY_BUDGET = dict(max_train=16, max_eval=8, max_test=8, epochs=1, batch_size=8, max_length=16, timing_warmup_steps=0)


@pytest.mark.parametrize("config", [
    LoRAConfig(r=4, alpha=8, targets=["query", "value"]),
    BottleneckConfig(placement="modules", bottleneck=8, targets=[r".*\.output\.dense"]),  # Houlsby's two places
    ParallelAdapterConfig(r=8, placement="modules", targets=["attention.self"])],
    ids=["lora", "bottleneck", "parallel"])
def test_train_an_adapter_on_transformers_bert(config):
    from minipeft.lab.train import Budget, SequenceClassifier, train

    torch.manual_seed(0)
    model = SequenceClassifier(TransformersBackbone(hf_bert()), num_labels=2)
    add_adapter(model, config, "task")
    train_adapter(model, "task")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task." in n or n.startswith("head.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, "sentiment", lr=1e-2, budget=Budget(**TINY_BUDGET), quiet=True, device="cpu")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable and any(".task." in n for n in changed), "the adapter trained, nothing else"


def test_train_lora_on_transformers_llama(smollm2):
    from minipeft.lab.train import Budget, SequenceClassifier, train

    tok = load_decoder_tokenizer()
    torch.manual_seed(0)
    model = SequenceClassifier(TransformersBackbone(hf_llama()), num_labels=2)
    add_adapter(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), "task")
    train_adapter(model, "task")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, "sentiment", lr=1e-3, budget=Budget(**{**TINY_BUDGET, "max_train": 8}), quiet=True,
                   tokenizer=tok, device="cpu")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert result.steps == 1 and changed and all(".task." in n or n.startswith("head.") for n in changed)


if __name__ == "__main__":  # prints the measured interop differences (the numbers the issue asks for)
    import tempfile
    from pathlib import Path

    from minipeft.lab.tasks import load_task, load_tokenizer

    torch.set_num_threads(2)
    enc_batch = load_tokenizer()(list(load_task("sentiment", max_test=8)["test"]["text"]), padding=True,
                                 return_tensors="pt")
    encoder, decoder = Encoder.from_pretrained(), Decoder.from_pretrained()
    heads_batch = headlines()
    for label, fn, args in [("export encoder (minipeft -> peft BertModel)", export_gap_encoder, (encoder, enc_batch)),
                            ("import encoder (peft BertModel -> minipeft)", import_gap_encoder, (encoder, enc_batch)),
                            ("export decoder (minipeft -> peft LlamaForCausalLM)", export_gap_decoder,
                             (decoder, heads_batch)),
                            ("import decoder (peft LlamaForCausalLM -> minipeft)", import_gap_decoder,
                             (decoder, heads_batch))]:
        with tempfile.TemporaryDirectory() as d:
            first = copy.deepcopy(args[0]) if "encoder" in label else args[0]
            diff, moved, *size = fn(first, args[1], Path(d))
        rel = f", {diff / size[0]:.1e} of the largest logit {size[0]:.1f}" if size else ""
        print(f"{label:52s} max |Δ| at real tokens {diff:.2e}{rel}  (the adapter moves outputs by {moved:.2e})")
