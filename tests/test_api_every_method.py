"""The core API on the real MiniLM: a file that does not fit changes nothing (every method), failing adds leave no
hooks, clear errors for bad files, honest stored counts, and a tolerance that catches bugs. What every method does
on every backbone (save → load, delete, counts, for_inference) is tests/test_conformance.py."""
import json

import pytest
import torch

from minipeft import (BottleneckConfig, CompacterConfig, CompacterPPConfig, LoRAConfig, ParallelAdapterConfig,
                      add_adapter, delete_adapter, load_adapter, parameter_summary, save_adapter)
from minipeft.api import CONFIG_FILE, WEIGHTS_FILE, stored_count
from minipeft.backbones.encoder import Encoder
from minipeft.methods.parallel import fuse_parallel_ffn
from minipeft.core import EXAMPLES
from minipeft.lab.train import SequenceClassifier
from helpers import TOL, assert_unchanged, gap, perturb, run, structure

# every example of every registered method (minipeft.core.EXAMPLES) that needs no other adapter
CONFIGS = {f"{method}-{label}": example.config() for method, examples in EXAMPLES.items()
           for label, example in examples.items() if not example.sources}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_failed_load_leaves_the_model_as_it_was(model, tmp_path, method):
    """A tensor that does not fit: the error names it and both shapes; the model keeps no trace."""
    add_adapter(model, CONFIGS[method], "a")
    save_adapter(model, "a", tmp_path)
    delete_adapter(model, "a")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / WEIGHTS_FILE))
    key = sorted(state)[-1]
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    before = structure(model)
    with pytest.raises(ValueError, match=rf"do not fit.*{key.replace('.', '[.]')}: file has shape"):
        load_adapter(model, tmp_path, name="b")
    assert_unchanged(model, before)


def test_failed_add_on_the_second_target_leaves_no_hooks(model):
    """LoRA attaches to q first; the second target fails: q keeps no container and no hook."""
    before = structure(model)
    with pytest.raises(ValueError, match="no Linear in the model matches target .nowhere."):
        add_adapter(model, LoRAConfig(targets=["q", "nowhere"]), "a")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="cannot infer the output width"):
        add_adapter(model, BottleneckConfig(placement="modules", targets=["ffn_out", r"layers\.0\.attn\.norm"]), "a")
    assert_unchanged(model, before)


def test_delete_a_merged_lora_restores_weights_and_hooks(model):
    from minipeft import merge_adapter

    before = structure(model)
    add_adapter(model, LoRAConfig(r=4), "a")
    perturb(model)
    merge_adapter(model, "a")
    delete_adapter(model, "a")
    after = structure(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert max((after["state"][k] - v).abs().max() for k, v in before["state"].items()) < 1e-6  # ΔW − ΔW rounding


# ---- clear errors for bad files ---------------------------------------------------------------------------------

@pytest.fixture
def saved(model, tmp_path):
    add_adapter(model, BottleneckConfig(bottleneck=8), "a")
    save_adapter(model, "a", tmp_path)
    delete_adapter(model, "a")
    return tmp_path


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:100]), "not a readable safetensors"),
    (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x00" * 64), "not a readable safetensors"),
    (lambda d: (d / CONFIG_FILE).write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / CONFIG_FILE).write_text(json.dumps({k: v for k, v in json.loads(
        (d / CONFIG_FILE).read_text()).items() if k != "backbone"})), r"lacks \['backbone'\]"),
])
def test_damaged_files_are_named_and_change_nothing(model, saved, damage, message):
    damage(saved)
    before = structure(model)
    with pytest.raises(ValueError, match=message) as error:
        load_adapter(model, saved)
    assert str(saved) in str(error.value)
    assert_unchanged(model, before)


def test_bad_checkpoints_are_explained(minilm, tmp_path):
    from safetensors.torch import save_file

    from minipeft.assets import minilm_path

    config = json.loads((minilm_path() / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "vocab_size"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks \['vocab_size'\]"):
        Encoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 768, "intermediate_size": 3072}))
    (tmp_path / "model.safetensors").write_bytes((minilm_path() / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match its config.*another hidden size"):
        Encoder.from_pretrained(tmp_path)


def test_token_type_ids_out_of_range(minilm, batch):
    with pytest.raises(ValueError, match=r"token_type_ids must be in \[0, 1\]"):
        minilm(batch["input_ids"], batch["attention_mask"], torch.full_like(batch["input_ids"], 2))


# ---- counting shared tensors once ------------------------------------------------------------------------------

@pytest.mark.parametrize("config,stored", [(CompacterConfig(reduction_factor=32), 14_320),
                                           (CompacterPPConfig(reduction_factor=32), 7_192)])
def test_stored_counts_the_shared_A_once(minilm, config, stored):
    model = SequenceClassifier(Encoder(minilm.cfg), 2)
    add_adapter(model, config, "c")
    assert parameter_summary(model, "c").stored == parameter_summary(model, "c").adapter == stored
    model.requires_grad_(False)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    assert stored_count(model) == stored


# ---- the tolerance: far below real bugs ------------------------------------------------------------------------

def test_tolerance_catches_a_dropped_scale(model, batch):
    """The fused parallel FFN equals the adapted model within TOL; dropping s is > 100 TOL away."""
    add_adapter(model, ParallelAdapterConfig(r=16, scale=4.0), "a")
    perturb(model)
    expected = run(model, batch)
    fuse_parallel_ffn(model, "a")
    assert gap(run(model, batch), expected, batch["attention_mask"]) < TOL
    ffn = model.layers[0].ffn
    with torch.no_grad():
        ffn.w_out[:, ffn.f:] /= 4  # the scale dropped in one layer
    assert gap(run(model, batch), expected, batch["attention_mask"]) > 100 * TOL


def test_tolerance_catches_a_wrong_lora_scale(model, batch):
    add_adapter(model, LoRAConfig(r=4, alpha=8), "a")
    perturb(model)
    expected = run(model, batch)
    layer = model.layers[0].attn.q.output_deltas["a"]
    layer.scale = 1.0  # α instead of α/r: 8 → 1 would be wrong by a factor of 2; here (α/r)=2 → 1
    assert gap(run(model, batch), expected, batch["attention_mask"]) > 100 * TOL


def test_targets_never_land_inside_another_adapter(model):
    """A Houlsby adapter has Linears named down/up; LoRA on "ffn_out" or a regex must not touch them."""
    add_adapter(model, BottleneckConfig(bottleneck=8), "adapter")
    add_adapter(model, LoRAConfig(r=2, targets=[r".*\.(up|down|ffn_out)"]), "lora")
    hooked = [n for n, m in model.named_modules() if hasattr(m, "output_deltas")]
    assert hooked == [f"layers.{i}.ffn.ffn_out" for i in range(6)]
