"""How the headline learning rates (``minipeft.lab.generation_train.GENERATION_LRS``) were chosen.

    .venv/bin/python bench/headline_lr_probe.py lora=1e-3,3e-3 prefix=3e-4,1e-3,3e-3,1e-2 mam=1e-3,3e-3
    .venv/bin/python bench/headline_lr_probe.py ia3=3e-3,1e-2,3e-2,1e-1 dora=1e-3,3e-3,1e-2 prompt_tuning=3e-3,1e-2,3e-2,1e-1

For each method and learning rate: the course's recipe on SmolLM2 (seed 0), 12 steps of 8 training articles with
``Budget.generation()``'s body budget, warm-up and decay, then the masked LM loss (the headline tokens) on the
first 32 validation articles; the lowest wins. A probe, not a sweep: short and on the loss, so that choosing costs
less than one comparison run. Prints the training losses too: a rate that diverges shows it there.
"""
import functools
import sys

import torch
from common import pin_threads
from torch.utils.data import DataLoader

from minipeft.lab.generation_tasks import load_headline
from minipeft.lab.generation_train import build_lm, decoder_tokenizer, lm_collate, lm_examples, lm_loss
from minipeft.lab.train import Budget, make_optimizer

STEPS, BATCH, VALIDATION = 12, 8, 32


@functools.lru_cache(maxsize=1)
def probe_data():
    """(budget, training examples, validation examples, collate): STEPS × BATCH training articles, VALIDATION
    validation ones. Load it before building a model: loading draws from torch's generator."""
    budget, tok = Budget.generation(), decoder_tokenizer()
    data = load_headline(STEPS * BATCH, VALIDATION, 1)
    train, validation = (lm_examples(data[s], tok, budget.max_length) for s in ("train", "validation"))
    return budget, train, validation, lambda b: lm_collate(b, tok.pad_token_id)


def validation_loss(model) -> float:
    """The masked LM loss (the headline tokens) on the probe's validation articles."""
    _, _, validation, collate = probe_data()
    with torch.no_grad():
        return sum(lm_loss(model, collate(validation[i:i + 16]), "cpu").item()
                   for i in range(0, VALIDATION, 16)) / (VALIDATION // 16)


def probe(model, lr: float) -> tuple[float, list[float]]:
    """Train ``model``'s trainable parameters STEPS steps at ``lr`` (the generation budget's warm-up, decay and
    clipping); returns (validation loss, the training losses)."""
    budget, train, _, collate = probe_data()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, lr, budget, STEPS)
    loader = DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=collate)
    losses = []
    for batch in loader:
        loss = lm_loss(model, batch, "cpu")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, budget.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 2))
    return validation_loss(model), losses


def main(argv):
    pin_threads(2)
    probe_data()
    print(f"zero_shot: validation loss {validation_loss(build_lm('zero_shot')):.3f}", flush=True)
    for method, rates in (arg.split("=") for arg in argv):
        for lr in map(float, rates.split(",")):
            val, losses = probe(build_lm(method, seed=0), lr)
            print(f"{method} lr {lr:g}: validation loss {val:.3f}; training losses {losses}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
