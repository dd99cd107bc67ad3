"""Small helpers shared by the method tests (fixtures live in conftest.py)."""
import torch


def run(model, batch):
    """The model's output on a tokenised batch, without gradients."""
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def state(model):
    """A detached copy of the model's state dict (to check what changed)."""
    return {k: v.clone() for k, v in model.state_dict().items()}
