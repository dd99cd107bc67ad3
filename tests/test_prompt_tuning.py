"""Prompt tuning (Lester et al. 2021): the soft tokens are tokens of the sequence at positions 0..l-1 (a prompt
initialised from token ids = the base model reading those tokens first), equal to peft's PromptTuningConfig on the
transformers twins, round trips through peft's files, KV-cache generation, counts and bad configs. What every
method does on every backbone (save/load, delete, inactive, for_inference, per_example) is test_conformance.py
and test_serving.py."""
import pytest
import torch

from minipeft import add_adapter, export_peft, generate, import_peft, parameter_summary
from minipeft.backbones import REGISTRY
from minipeft.methods.prompt_tuning import PromptTuningConfig, prompt_tuning_count
from helpers import TOL, assert_unchanged, build, gap, padded_tokens, perturb, run, structure, twins


@pytest.mark.parametrize("family", list(REGISTRY))
def test_a_prompt_from_token_ids_is_the_model_reading_them_first(family):
    """P = W_e[t_1..t_l]: the hidden states of the real tokens = the base model's on [t_1..t_l; X] at X (the soft
    tokens take positions 0..l-1, token type 0; the real tokens l..l+n-1)."""
    model = build(family)
    left = hasattr(model, "new_cache")
    batch = padded_tokens(model.cfg, 8, (0, 3, 5), left=left)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hard = [7, 11, 13, 17]
    add_adapter(model, PromptTuningConfig(length=4, init_tokens=hard), "p")
    soft = run(model, batch)
    model.prompts["p"].active = False
    B = ids.shape[0]
    if left:  # the decoder's real tokens are numbered from the first real one: the hard prompt sits right before
        rows = [torch.cat([ids[i, :int((mask[i] == 0).sum())], torch.tensor(hard), ids[i, int((mask[i] == 0).sum()):]])
                for i in range(B)]
        rows_mask = [torch.cat([mask[i, :int((mask[i] == 0).sum())], torch.ones(4, dtype=mask.dtype),
                                mask[i, int((mask[i] == 0).sum()):]]) for i in range(B)]
        full = {"input_ids": torch.stack(rows), "attention_mask": torch.stack(rows_mask)}
        hard_out = run(model, full)
        cut = torch.stack([torch.cat([hard_out[i, :int((mask[i] == 0).sum())], hard_out[i, int((mask[i] == 0).sum()) + 4:]])
                           for i in range(B)])
    else:
        full = {"input_ids": torch.cat([torch.tensor([hard]).expand(B, -1), ids], 1),
                "attention_mask": torch.cat([torch.ones(B, 4, dtype=mask.dtype), mask], 1)}
        cut = run(model, full)[:, 4:]
    assert soft.shape == (B, 8, model.cfg.hidden_size)
    assert gap(soft, cut, mask) < TOL
    assert gap(soft, run(build(family), batch), mask) > 100 * TOL  # the prompt changes the outputs


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_equals_peft_prompt_tuning_both_ways(family, tmp_path):
    """Our prompt exported to peft's files gives peft's outputs at the real tokens, and a peft PromptTuningConfig
    (random init) imported gives ours; unpadded and right-padded batches (peft numbers positions by array place)."""
    from peft import PeftModel, PromptTuningConfig as PeftPromptTuning, get_peft_model

    hf, ours, _, hf_output, our_output = twins(family)
    l = 5
    add_adapter(ours, PromptTuningConfig(length=l, init="random"), "a")
    export_peft(ours, "a", tmp_path / "ours")
    theirs = PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    for pads in ((0, 0), (0, 3)):
        batch = padded_tokens(ours.cfg, 9, pads, left=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            peft_out = hf_output(theirs(input_ids=ids, attention_mask=mask))[:, l:]  # after its l virtual tokens
            mine = our_output(ours, ours(ids, mask))
        assert gap(mine, peft_out, mask) < TOL, pads

    torch.manual_seed(1)
    hf2, ours2, _, hf_output, our_output = twins(family)
    task = "CAUSAL_LM" if family == "llama" else "FEATURE_EXTRACTION"
    peft_model = get_peft_model(hf2, PeftPromptTuning(task_type=task, num_virtual_tokens=l)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(ours2, tmp_path / "peft", "b")
    assert torch.equal(ours2.prompts["b"].weight, peft_model.prompt_encoder["default"].embedding.weight)
    batch = padded_tokens(ours2.cfg, 9, (0, 2), left=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        assert gap(our_output(ours2, ours2(ids, mask)), hf_output(peft_model(input_ids=ids, attention_mask=mask))[:, l:],
                   mask) < TOL


def test_peft_files_round_trip(tmp_path):
    model = build("llama")
    add_adapter(model, PromptTuningConfig(length=3), "a")
    perturb(model, "a")
    export_peft(model, "a", tmp_path)
    fresh = build("llama")
    config = import_peft(fresh, tmp_path, "a")
    assert config.length == 3 and torch.equal(fresh.prompts["a"].weight, model.prompts["a"].weight)
    batch = padded_tokens(model.cfg, 6, (0, 2))
    assert torch.equal(run(fresh, batch), run(model, batch))
    before = structure(fresh)  # a file for another width changes nothing
    with pytest.raises(ValueError, match="already exists"):
        import_peft(fresh, tmp_path, "a")
    from minipeft.backbones.decoder import Decoder, DecoderConfig

    wide = Decoder(DecoderConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=48, max_position=64))
    wide_before = structure(wide)
    with pytest.raises(ValueError, match=r"\(3, 32\)"):
        import_peft(wide, tmp_path, "a")
    assert_unchanged(wide, wide_before)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("family", [f for f in REGISTRY if hasattr(REGISTRY[f].cls, "new_cache")])
def test_generation_with_the_kv_cache_equals_without(family):
    """The soft tokens enter the cache on the first call (with the prompt), never again; greedy decoding with the
    cache = recomputing everything each step, batched left-padded prompts included."""
    model = build(family)
    add_adapter(model, PromptTuningConfig(length=4, init="random"), "p")
    torch.manual_seed(7)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,)).tolist() for n in (5, 2, 7)]
    cached = generate(model, prompts, max_new_tokens=6, stop_at_eos=False)
    plain = generate(model, prompts, max_new_tokens=6, stop_at_eos=False, use_cache=False)
    assert cached.tokens == plain.tokens
    assert len(cached.cache) == 4 + 7 + 6 - 1  # the l soft tokens, the longest prompt, the tokens fed back


def test_counts_are_l_times_d(minilm):
    import copy

    model = copy.deepcopy(minilm)
    add_adapter(model, PromptTuningConfig(length=20), "a")
    summary = parameter_summary(model, "a")
    assert summary.adapter == summary.stored == prompt_tuning_count(384, 20) == 7680
    assert model.prompts["a"].weight.numel() == 7680


@pytest.mark.parametrize("kwargs,message", [
    ({"length": 0}, "positive integer"), ({"length": 2.5}, "positive integer"), ({"init": "text"}, "unknown"),
    ({"length": 2, "init_tokens": [1]}, "exactly length=2"), ({"init": "random", "length": 1, "init_tokens": [1]},
                                                               "needs init='vocab'")])
def test_bad_configs_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTuningConfig(**kwargs)


def test_token_ids_outside_the_vocabulary_change_nothing():
    model = build("llama")
    before = structure(model)
    with pytest.raises(ValueError, match=r"token ids in \[0, 299\]"):
        add_adapter(model, PromptTuningConfig(length=2, init_tokens=[5, 300]), "a")
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", list(REGISTRY))
def test_soft_tokens_count_against_the_context(family):
    """l + n positions must fit: a clear error, not an index error deep in a position table."""
    model = build(family)
    add_adapter(model, PromptTuningConfig(length=10, init="random"), "p")
    limit = model.cfg.max_position - getattr(model.cfg, "position_offset", 0)
    fits = padded_tokens(model.cfg, limit - 10, (0,))
    assert run(model, fits).shape[1] == limit - 10
    with pytest.raises(ValueError, match=rf"after 10 soft tokens .prompt tuning. exceed the context of {limit}"):
        run(model, padded_tokens(model.cfg, limit - 9, (0,)))
