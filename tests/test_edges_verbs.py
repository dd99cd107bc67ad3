"""The edges of the verbs (issue 25): new modules take the model's train/eval mode; peft adapters that change the base
weights (PiSSA, OLoRA) import as peft reloads them, the ones that cannot be rebuilt are refused; names are checked
by every verb; a fusion's source cannot be deleted under it; sampling at any temperature > 0; train() tokenizes with
the model's own tokenizer. Every refused call leaves the model exactly as it was (``helpers.structure`` plus the
adapters' active flags). Real MiniLM / SmolLM2 weights, real tokens; equality with peft within ``INTEROP_TOL``
(tests/test_interop.py: same process, same thread count, ≈ 2e-6 measured)."""
import copy
import dataclasses
import json
import shutil

import pytest
import torch
from helpers import TOL, assert_unchanged, gap, perturb, structure
from safetensors.torch import load_file, save_file

from minipeft import (BottleneckConfig, FusionConfig, LoRAConfig, activate, add_adapter, deactivate, delete_adapter,
                      freeze_adapters, generate, import_peft, load_adapter, merge_adapter, save_adapter, set_active)
from minipeft.api import CONFIG_FILE, WEIGHTS_FILE
from minipeft.assets import minilm_path
from minipeft.core import adapter_modules
from minipeft.generation import sample
from minipeft.interop import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TransformersBackbone, tokenizer_dir

INTEROP_TOL = 1e-5  # as in tests/test_interop.py


def hf_bert():
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()


def out(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def bert_out(hf, batch):
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def snapshot(model):
    """``helpers.structure`` and which adapter modules are active."""
    return structure(model), {p: m.active for p, m in adapter_modules(model).items()}


def assert_same(model, before):
    assert_unchanged(model, before[0])
    assert {p: m.active for p, m in adapter_modules(model).items()} == before[1], "the active adapters changed"


def refused(model, error, match, call):
    """``call()`` raises ``error`` matching ``match`` and leaves ``model`` exactly as it was; the message."""
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        call()
    assert_same(model, before)
    return str(info.value)


# ---- train / eval mode: a module added to a model takes its parent's mode -----------------------------------

def test_an_adapter_added_to_an_eval_model_is_in_eval_mode(model, batch):
    assert not model.training
    add_adapter(model, LoRAConfig(r=4, dropout=0.5, targets=["q", "v"]), "a")
    perturb(model, "a")
    assert not any(m.training for m in model.modules())
    assert torch.equal(out(model, batch), out(model, batch)), "no dropout in an eval() model"
    model.train()
    add_adapter(model, LoRAConfig(r=4, dropout=0.5, targets=["k"]), "b")  # and a training model's stay training
    assert all(m.training for m in model.modules())


def test_load_adapter_into_an_eval_model_is_in_eval_mode(model, minilm, batch, tmp_path):
    add_adapter(model, LoRAConfig(r=4, dropout=0.5), "a")
    perturb(model, "a")
    save_adapter(model, "a", tmp_path)
    fresh = copy.deepcopy(minilm)
    load_adapter(fresh, tmp_path)
    assert not any(m.training for m in fresh.modules())
    assert torch.equal(out(fresh, batch), out(model.eval(), batch))


def test_a_fusion_added_to_an_eval_model_is_in_eval_mode(model, batch):
    for name in ("s0", "s1"):
        add_adapter(model, BottleneckConfig(placement="pfeiffer", bottleneck=8, init_std=0.1), name)
    freeze_adapters(model, "s0", "s1")
    add_adapter(model, FusionConfig(adapters=["s0", "s1"], dropout=0.5), "f")
    assert not any(m.training for m in model.modules())
    assert torch.equal(out(model, batch), out(model, batch))


def peft_lora(hf, directory, seed=0, **config):
    """A peft LoRA made by peft on ``hf`` and "trained" (A, B moved by seeded noise), saved to ``directory``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(hf, LoraConfig(**config))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(str(directory))
    return directory


def peft_reload(directory, batch):
    """What peft computes for the saved adapter: ``PeftModel.from_pretrained`` on a fresh BertModel, eval mode."""
    from peft import PeftModel

    return bert_out(PeftModel.from_pretrained(hf_bert(), str(directory)).eval(), batch)


def test_import_peft_with_dropout_equals_peft_in_eval_mode(minilm, batch, tmp_path):
    """lora_dropout=0.1: a freshly loaded (eval) model must not drop anything (it was 2.6 off peft before)."""
    peft_lora(hf_bert(), tmp_path, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"])
    fresh = copy.deepcopy(minilm)
    import_peft(fresh, tmp_path)
    assert not any(m.training for m in fresh.modules())
    assert gap(out(fresh, batch), peft_reload(tmp_path, batch), batch["attention_mask"]) < INTEROP_TOL


# ---- peft adapters that change the base weights -------------------------------------------------------------

@pytest.fixture
def one_thread():
    """SVD / QR (LAPACK) on 2 threads stall on a busy machine (one 384×384 SVD: 8.7 s instead of 0.04 s at load 10):
    the tests that run them (in peft and in minipeft alike) use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", True)])
def test_pissa_and_olora_import_as_peft_reloads_them(minilm, batch, tmp_path, one_thread, init, rslora):
    """peft's reload sets W = W0 − s·B0A0 (from W0's SVD / QR) and adds s·BA; minipeft keeps W0 and imports the
    rank-2r LoRA [B | B0][A; −A0]: the same function, and the base model is still there when it is inactive.
    Tolerance ``helpers.TOL``, not 1e-5: peft rounds W0 − s·B0A0 into one weight, minipeft adds −s·B0(A0 x) beside
    W0 x; s·B0A0 is W0's largest part (its top singular directions / leading QR columns), so the two orders of
    fp32 operations differ by rounding on terms of W0 x's size (≈ 3e-6 PiSSA, 1.0e-5 OLoRA measured)."""
    peft_lora(hf_bert(), tmp_path, r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=init,
              target_modules=["query", "value"])
    assert json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())["init_lora_weights"] == init  # as saved
    fresh, real = copy.deepcopy(minilm), batch["attention_mask"]
    config = import_peft(fresh, tmp_path)
    assert config.r == 8 and abs(config.scale - (8 / 4 ** 0.5 if rslora else 8 / 4)) < 1e-12  # s kept
    ours = out(fresh, batch)
    assert gap(ours, peft_reload(tmp_path, batch), real) < TOL
    assert gap(ours, out(minilm, batch), real) > 100 * TOL
    assert all(torch.equal(v, minilm.state_dict()[k]) for k, v in fresh.state_dict().items() if k in
               minilm.state_dict()), "the base weights are left as they were"
    set_active(fresh)
    assert torch.equal(out(fresh, batch), out(minilm, batch))


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A plain peft LoRA (query, value, r=4) saved by peft on transformers' BertModel."""
    return peft_lora(hf_bert(), tmp_path_factory.mktemp("peft"), r=4, lora_alpha=8, target_modules=["query", "value"])


def spoiled(peft_dir, tmp_path, **changes):
    d = tmp_path / "adapter"
    shutil.copytree(peft_dir, d)
    cfg = json.loads((d / PEFT_CONFIG_FILE).read_text())
    (d / PEFT_CONFIG_FILE).write_text(json.dumps({**cfg, **changes}))
    return d


@pytest.mark.parametrize("init", ["eva", "mica", "orthogonal"])
def test_inits_that_leave_the_base_weights_import_as_saved(minilm, batch, peft_dir, tmp_path, one_thread, init):
    d = spoiled(peft_dir, tmp_path, init_lora_weights=init)
    fresh = copy.deepcopy(minilm)
    assert import_peft(fresh, d).r == 4
    assert gap(out(fresh, batch), peft_reload(d, batch), batch["attention_mask"]) < INTEROP_TOL


def test_layers_to_transform_is_honoured(minilm, batch, tmp_path):
    peft_lora(hf_bert(), tmp_path, r=4, lora_alpha=8, layers_to_transform=[1, 4], target_modules=["query", "value"])
    fresh = copy.deepcopy(minilm)
    import_peft(fresh, tmp_path)
    assert sorted({p.split(".")[1] for p in adapter_modules(fresh, "default")}) == ["1", "4"]
    assert gap(out(fresh, batch), peft_reload(tmp_path, batch), batch["attention_mask"]) < INTEROP_TOL


REFUSED = {  # peft config changes -> what the error must say
    "PiSSA by randomized SVD": (dict(init_lora_weights="pissa_niter_4"),
                                r"init_lora_weights='pissa_niter_4'.*svd_lowrank"),
    "CorDA": (dict(init_lora_weights="corda"), r"init_lora_weights='corda'.*calibration data"),
    "LoftQ": (dict(init_lora_weights="loftq"), r"init_lora_weights='loftq'.*quantization"),
    "LoRA-GA": (dict(init_lora_weights="lora_ga"), r"init_lora_weights='lora_ga'.*gradients"),
    "an unknown init": (dict(init_lora_weights="fancy"), r"init_lora_weights='fancy'.*'pissa', 'olora'"),
    "a rank per layer": (dict(rank_pattern={"query": 8}), "rank_pattern"),
    "an alpha per layer": (dict(alpha_pattern={"query": 8}), "alpha_pattern"),
    "trained biases": (dict(bias="all"), "bias='all'"),
    "LoRA bias": (dict(lora_bias=True), "lora_bias=True"),
    "layer replication": (dict(layer_replication=[[0, 4]]), "layer_replication"),
    "VeLoRA": (dict(velora_config={"rank": 2}), "velora_config"),
    "Arrow routing": (dict(arrow_config={"top_k": 2}), "arrow_config"),
    "a field minipeft does not know": (dict(use_future_variant=True), r"use_future_variant=True.*does not know"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_peft_options_that_would_mis_import_are_refused(model, peft_dir, tmp_path, case):
    changes, message = REFUSED[case]
    d = spoiled(peft_dir, tmp_path, **changes)
    text = refused(model, ValueError, message, lambda: import_peft(model, d))
    assert str(d / PEFT_CONFIG_FILE) in text, "the error names the file"


def test_pissa_onto_a_merged_lora_is_refused(model, peft_dir, tmp_path):
    add_adapter(model, LoRAConfig(r=2, targets=["q"]), "m")
    perturb(model, "m")
    merge_adapter(model, "m")
    d = spoiled(peft_dir, tmp_path, init_lora_weights="pissa")
    refused(model, ValueError, r"defined on the pretrained weights.*layers\.0\.attn\.q.*unmerge",
            lambda: import_peft(model, d))


def test_a_peft_config_value_minipeft_refuses_names_the_file(model, peft_dir, tmp_path):
    d = spoiled(peft_dir, tmp_path, lora_dropout=1.5)
    refused(model, ValueError, r"adapter_config\.json: dropout must be in \[0, 1\)", lambda: import_peft(model, d))


# ---- names: every verb checks them before it changes anything ----------------------------------------------

@pytest.fixture
def two(model):
    add_adapter(model, LoRAConfig(r=2), "sentiment")
    add_adapter(model, BottleneckConfig(bottleneck=4), "topic")
    deactivate(model, "topic")
    return model


@pytest.mark.parametrize("verb", [activate, deactivate, set_active, delete_adapter])
def test_a_typo_is_an_error_listing_the_adapters(two, verb):
    text = refused(two, KeyError, "no adapter named 'sentimnet'", lambda: verb(two, "sentimnet"))
    assert "['sentiment', 'topic']" in text


@pytest.mark.parametrize("names,error,message", [
    (("sentiment", "sentiment"), ValueError, r"\['sentiment'\] are given more than once"),
    ((["sentiment", "topic"],), TypeError, "adapter names are strings, one per argument"),
    (("topic", "nope", "nada"), KeyError, r"no adapter named 'nope' \(nor \['nada'\]\)")])
def test_set_active_refuses_bad_names(two, names, error, message):
    refused(two, error, message, lambda: set_active(two, *names))


def test_activating_twice_or_deactivating_an_inactive_adapter_changes_nothing(two):
    before = snapshot(two)
    activate(two, "sentiment")
    deactivate(two, "topic")
    assert_same(two, before)


# ---- AdapterFusion: its sources stay while it reads them -----------------------------------------------------

def test_deleting_a_fusion_source_is_refused_until_the_fusion_goes(model, batch):
    for name in ("s0", "s1"):
        add_adapter(model, BottleneckConfig(placement="pfeiffer", bottleneck=8, init_std=0.1), name)
    freeze_adapters(model, "s0", "s1")
    add_adapter(model, FusionConfig(adapters=["s0", "s1"]), "f")
    fused = out(model, batch)
    refused(model, ValueError, r"'s0' is a source of AdapterFusion 'f'.*delete_adapter\(model, 'f'\)\), then 's0'",
            lambda: delete_adapter(model, "s0"))
    assert torch.equal(out(model, batch), fused), "the fusion still runs"
    delete_adapter(model, "f")
    delete_adapter(model, "s0")
    out(model, batch)


# ---- load_adapter: a bad file is named ---------------------------------------------------------------------------

def _edit_meta(d, edit):
    meta = json.loads((d / CONFIG_FILE).read_text())
    edit(meta)
    (d / CONFIG_FILE).write_text(json.dumps(meta))


BAD_SAVES = {
    "a bad value": (lambda d: _edit_meta(d, lambda m: m["config"].update(r=-1)),
                    "does not describe a valid adapter: r \\(the rank\\) must be a positive integer"),
    "an unknown field": (lambda d: _edit_meta(d, lambda m: m["config"].update(rank=4)), r"unknown fields \['rank'\]"),
    "a name that is no identifier": (lambda d: _edit_meta(d, lambda m: m.update(name="my adapter")),
                                     "name 'my adapter' is not an identifier"),
    "a backbone that is no object": (lambda d: _edit_meta(d, lambda m: m.update(backbone="MiniLM")),
                                     "backbone is a str"),
    "targets not in this model": (lambda d: _edit_meta(d, lambda m: m["config"].update(targets=["q_proj"])),
                                  "into this model: no Linear in the model matches target 'q_proj'"),
    "a truncated weights file": (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:100]),
                                 "not a readable safetensors file"),
    "a missing weights file": (lambda d: (d / WEIGHTS_FILE).unlink(), f"expected {CONFIG_FILE} and {WEIGHTS_FILE}"),
    "a tensor too few": (lambda d: save_file(dict(list(load_file(str(d / WEIGHTS_FILE)).items())[1:]),
                                             str(d / WEIGHTS_FILE)), "do not fit a lora adapter .* missing"),
}


@pytest.mark.parametrize("case", list(BAD_SAVES))
def test_load_adapter_names_what_is_wrong_and_changes_nothing(two, tmp_path, case):
    add_adapter(two, LoRAConfig(r=2, targets=["k"]), "saved")
    save_adapter(two, "saved", tmp_path)
    delete_adapter(two, "saved")
    spoil, message = BAD_SAVES[case]
    spoil(tmp_path)
    text = refused(two, (ValueError, FileNotFoundError), message, lambda: load_adapter(two, tmp_path))
    assert str(tmp_path) in text, "the error names the file or directory"


# ---- generate: sampling at any temperature > 0 -------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-45, 5e-324])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    """softmax(z/τ) → one-hot on argmax z as τ → 0 (uniform over exact ties); z/τ itself overflows to inf."""
    z = torch.tensor([[1.0, 30.0, 29.9, -5.0], [2.0, 2.0, 1.0, 0.0]]).repeat(200, 1)  # row 2: a tie at 0 and 1
    drawn = sample(z, temperature, 1.0, torch.Generator().manual_seed(0)).view(200, 2)
    assert (drawn[:, 0] == 1).all()
    assert set(drawn[:, 1].tolist()) == {0, 1}


def test_generate_with_a_tiny_temperature_is_greedy(smollm2):
    prompt = [[1, 504, 3575, 282]]
    greedy = generate(smollm2, prompt, max_new_tokens=3, stop_at_eos=False).tokens
    assert generate(smollm2, prompt, max_new_tokens=3, stop_at_eos=False, do_sample=True, temperature=1e-45,
                    seed=0).tokens == greedy


# ---- train(): the model's own tokenizer, never MiniLM's by default -------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from minipeft.backbones.decoder import Decoder

    return Decoder.from_pretrained()


def tiny_llama(directory=None):
    """A 1-layer LlamaForCausalLM with SmolLM2's vocabulary; saved with SmolLM2's tokenizer in ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minipeft.backbones.decoder import load_decoder_tokenizer

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    if directory is None:
        return llama
    llama.save_pretrained(str(directory))
    load_decoder_tokenizer().save_pretrained(str(directory))
    return LlamaForCausalLM.from_pretrained(str(directory))


def classifier(llama):
    from minipeft.lab.train import SequenceClassifier

    torch.manual_seed(0)
    model = SequenceClassifier(TransformersBackbone(llama), num_labels=2)
    add_adapter(model, LoRAConfig(r=2, targets=["q_proj"]), "task")
    from minipeft.api import train_adapter

    train_adapter(model, "task")
    return model


TINY = dict(max_train=16, max_eval=8, max_test=8, epochs=1, batch_size=8, max_length=16, timing_warmup_steps=0)


def test_a_wrapped_llama_trains_with_its_own_tokenizer(tmp_path):
    from minipeft.backbones.decoder import load_decoder_tokenizer
    from minipeft.lab.tasks import load_tokenizer
    from minipeft.lab.train import Budget, train

    llama = tiny_llama(tmp_path)
    assert tokenizer_dir(TransformersBackbone(llama)) == str(tmp_path)

    def losses(**kw):
        return train(classifier(copy.deepcopy(llama)), "sentiment", 1e-2, Budget(**TINY), quiet=True, device="cpu",
                     **kw).losses

    own = losses()
    assert own == losses(tokenizer=load_decoder_tokenizer())
    assert own != losses(tokenizer=load_tokenizer()), "MiniLM's ids give other losses: the check has teeth"


def test_a_model_without_a_tokenizer_on_disk_needs_tokenizer(tmp_path):
    from minipeft.lab.train import Budget, train

    model = classifier(tiny_llama())  # made from a config: no checkpoint directory
    refused(model, ValueError, r"needs the tokenizer of this LlamaForCausalLM.*tokenizer=",
            lambda: train(model, "sentiment", 1e-2, Budget(**TINY), quiet=True, device="cpu"))


def test_minipeft_backbones_name_their_tokenizer(minilm, smollm2):
    from minipeft.backbones.decoder import checkpoint_dir
    from minipeft.backbones.encoder import Encoder

    assert tokenizer_dir(minilm) == str(minilm_path())
    random = Encoder(dataclasses.replace(minilm.cfg, name="MiniLM-sized (random)"))
    assert tokenizer_dir(random) is None  # no checkpoint: its family's, MiniLM's (tasks.load_tokenizer)
    assert tokenizer_dir(smollm2) == str(checkpoint_dir())
    with pytest.raises(ValueError, match="cannot tell which tokenizer a Linear encoder reads"):
        tokenizer_dir(torch.nn.Linear(2, 2))


def test_merging_an_inactive_lora_is_refused(model, batch):
    """Merging folds ΔW into W0: on an adapter that reads as off it would change the output, so it is refused."""
    add_adapter(model, LoRAConfig(r=4, alpha=8, targets=["q", "v"]), "m")
    perturb(model)  # B ≠ 0, so a wrong merge would show
    deactivate(model, "m")
    refused(model, RuntimeError, "'m' is inactive.*activate it before merging", lambda: merge_adapter(model, "m"))
    activate(model, "m")
    merge_adapter(model, "m")  # the allowed path still works
