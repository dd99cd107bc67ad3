"""The from-scratch encoder equals transformers' BertModel on the same weights."""
import json

import pytest
import torch
from transformers import BertModel

from minipeft.assets import minilm_path
from minipeft.backbones.encoder import Encoder, EncoderConfig
from helpers import TOL


@pytest.fixture(scope="module")
def hf_bert():
    return BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()


def test_minilm_facts(minilm):
    c = minilm.cfg
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) == (6, 384, 12, 1536)
    # 22,713,216 with the pooler (384*384 + 384), which the encoder drops
    assert sum(p.numel() for p in minilm.parameters()) == 22_713_216 - 384 * 384 - 384


def test_bert_base_sized_count(bert_base_sized):
    # BERT-base without its pooler: 109,482,240 - (768*768 + 768)
    assert sum(p.numel() for p in bert_base_sized.parameters()) == 109_482_240 - 768 * 768 - 768


def test_equals_transformers_bert(minilm, hf_bert, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0, "the test must exercise padding"
    with torch.no_grad():
        theirs = hf_bert(**batch).last_hidden_state
        ours = minilm(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()  # padded positions are undefined in both
    assert (ours - theirs)[real].abs().max() < TOL


def test_from_hf_equals_from_pretrained(minilm, hf_bert):
    converted = Encoder.from_hf(hf_bert)
    for (n1, p1), (n2, p2) in zip(minilm.state_dict().items(), converted.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_padding_does_not_change_real_tokens(minilm, tokenizer, sentences):
    alone = tokenizer([sentences[0]], return_tensors="pt")
    padded = tokenizer([sentences[0], sentences[0] + " " + sentences[1] * 3], padding=True, return_tensors="pt")
    assert padded["attention_mask"][0].min() == 0
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        a = minilm(alone["input_ids"], alone["attention_mask"])
        b = minilm(padded["input_ids"], padded["attention_mask"])
    assert (a[0] - b[0, :n]).abs().max() < TOL


def test_roberta_position_offsets_match_transformers():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
    hf = RobertaModel(cfg, add_pooling_layer=False).eval()
    ours = Encoder.from_hf(hf)
    ids = torch.randint(3, 100, (2, 10))
    ids[1, 7:] = 1
    mask = (ids != 1).long()
    with torch.no_grad():
        diff = (hf(input_ids=ids, attention_mask=mask).last_hidden_state - ours(ids, mask))[mask.bool()]
    assert diff.abs().max() < TOL


# ---- bad input ---------------------------------------------------------------------------------------------

def test_wrong_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        Encoder.from_pretrained(tmp_path)


def test_other_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="'gpt2' model.*BERT family"):
        Encoder.from_pretrained(tmp_path)


def test_weights_of_another_shape(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text((minilm_path() / "config.json").read_text())
    save_file({"embeddings.word_embeddings.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not fit a BERT-family encoder: missing"):
        Encoder.from_pretrained(tmp_path)


def test_token_ids_out_of_range(minilm):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 30521\]"):
        minilm(torch.tensor([[101, 30522]]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        minilm(torch.tensor([101, 102]))


def test_mask_of_wrong_shape(minilm):
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(1, 3\)"):
        minilm(torch.tensor([[101, 2000, 102]]), torch.ones(1, 4))


def test_too_long(minilm):
    with pytest.raises(ValueError, match="exceeds the maximum of 512 positions"):
        minilm(torch.ones(1, 513, dtype=torch.long))


def test_bad_config():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        EncoderConfig(hidden_size=10, num_heads=3)
