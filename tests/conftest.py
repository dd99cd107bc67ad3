import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one torch thread per pytest-xdist worker (two workers on two cores); two threads otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def minilm():
    """The pretrained MiniLM encoder (ours), in eval mode."""
    from minipeft.backbones.encoder import Encoder

    return Encoder.from_pretrained()


@pytest.fixture(scope="session")
def tokenizer():
    from minipeft.lab.tasks import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def sentences():
    """Real review snippets of different lengths (padding is exercised)."""
    from minipeft.lab.tasks import load_task

    return list(load_task("sentiment", max_test=8)["test"]["text"])


@pytest.fixture
def bert_base_sized():
    """A randomly initialised BERT-base-sized encoder (d=768, L=12, FFN 3072): for parameter counts."""
    from minipeft.backbones.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    return Encoder(EncoderConfig())


@pytest.fixture
def model(minilm):
    """A private copy of the pretrained encoder, free to modify."""
    import copy

    return copy.deepcopy(minilm)


@pytest.fixture(scope="session")
def batch(tokenizer, sentences):
    """The real sentences, tokenised and padded."""
    return tokenizer(sentences, padding=True, return_tensors="pt")
