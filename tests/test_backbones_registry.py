"""The backbone registry and the one loading path: each backbone registers itself (class, tiny config, asset,
tokenizer), ``from_hf`` / ``from_pretrained`` go through ``Backbone.from_hf_state`` and the backbone's conversion
hook, and the real checkpoints load bit-identically: every tensor of MiniLM and SmolLM2 equals the file's."""
import pytest
import torch
from safetensors.torch import load_file

from minipeft.assets import minilm_path
from minipeft.backbones import REGISTRY, get_backbone
from minipeft.backbones.contract import Backbone
from minipeft.backbones.decoder import Decoder, checkpoint_dir
from minipeft.backbones.encoder import Encoder
from minipeft.backbones.gpt2 import GPT2


def test_every_backbone_is_registered_by_family():
    assert {f: e.cls for f, e in REGISTRY.items()} == {"bert": Encoder, "llama": Decoder, "gpt2": GPT2}
    for family, entry in REGISTRY.items():
        model = entry.cls(entry.tiny())
        assert isinstance(model, Backbone) and model.identity()["family"] == family
        assert {s.linears().keys() >= {"q", "k", "v", "o"} for s in model.sites("attn")} == {True}
    assert REGISTRY["bert"].asset == "minilm" and REGISTRY["llama"].asset == "smollm2"
    assert REGISTRY["gpt2"].asset is None
    with pytest.raises(KeyError, match=r"unknown backbone 'gpt3'; registered backbones: \['bert', 'gpt2', 'llama'\]"):
        get_backbone("gpt3")
    with pytest.raises(ValueError, match="no offline GPT-2 checkpoint"):
        REGISTRY["gpt2"].tokenizer()


def test_registered_tokenizers_are_the_assets_own():
    bert, llama = REGISTRY["bert"].tokenizer(), REGISTRY["llama"].tokenizer()
    assert bert.vocab_size == Encoder.from_pretrained().cfg.vocab_size == 30522
    assert llama.chat_template and len(llama) == 49152


@pytest.mark.parametrize("cls, directory", [(Encoder, lambda: minilm_path()), (Decoder, lambda: checkpoint_dir())])
def test_real_checkpoints_load_bit_identically(cls, directory):
    """Through the conversion hook, every parameter is the checkpoint's tensor under its transformers name."""
    path = directory()
    model = cls.from_pretrained(path)
    weights = load_file(str(path / "model.safetensors"))
    prefix = "bert." if cls is Encoder and any(k.startswith("bert.") for k in weights) else ""
    state = model.state_dict()
    assert state and all(torch.equal(v, weights[prefix + model.hf_name(k)]) for k, v in state.items())
    assert all(v.dtype == torch.float32 for v in state.values())


def test_one_loading_path():
    """No backbone keeps a loader of its own: each overrides only the conversion hook."""
    for entry in REGISTRY.values():
        for method in ("from_hf", "from_hf_dir", "from_hf_state", "load_hf_state_dict"):
            assert method not in vars(entry.cls), f"{entry.cls.__name__} overrides {method}"
        assert "convert_hf_state" in vars(entry.cls)


@pytest.mark.parametrize("family", sorted(REGISTRY))
def test_roles_name_the_same_projections_on_every_backbone(family):
    """A recipe's role means the same part everywhere: "q"/"v" the query/value projections, "ffn_in" the linears
    before the FFN's activation (Llama's gate and up), "ffn_out" the one after; LoRA on roles lands exactly there."""
    from minipeft import LoRAConfig, add_adapter
    from minipeft.core import ROLES, adapter_modules

    torch.manual_seed(0)
    entry = REGISTRY[family]
    model = entry.cls(entry.tiny())
    layer = model.layers[0]
    d, f = model.hidden_size, model.cfg.intermediate_size
    assert [m.out_features for m in layer.attn.role("q")] == [d]
    assert [m.out_features for m in layer.attn.role("v")] == [model.attention.kv_width]
    assert [m.out_features for m in layer.ffn.role("ffn_in")] == ([f, f] if family == "llama" else [f])
    assert [m.in_features for m in layer.ffn.role("ffn_out")] == [f]
    assert layer.attn.role("ffn_in") == [] and layer.ffn.role("q") == []
    add_adapter(model, LoRAConfig(r=2, targets=["v", "ffn_in"]), "a")
    hosts = {id(m.base_layer) for m in adapter_modules(model, "a").values()}
    expected = {id(m) for block in model.layers for m in block.attn.role("v") + block.ffn.role("ffn_in")}
    assert hosts == expected and len(expected) == model.num_layers * (1 + len(layer.ffn.role("ffn_in")))
    with pytest.raises(ValueError, match="unknown role 'query'"):
        layer.attn.role("query")
    assert set(ROLES) == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
