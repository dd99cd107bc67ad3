"""Training: a sequence-classification head on the encoder, a budget, and one small, seeded loop.

    model = SequenceClassifier(Encoder.from_pretrained(), num_labels=2)   # masked mean pooling + Linear
    result = train(model, "sentiment", lr=1e-4, budget=Budget.from_env(), method="full")

The loop: AdamW (Loshchilov & Hutter 2019) on the parameters with ``requires_grad`` only, learning rate
warmed up linearly over ``warmup_ratio`` of the steps then decayed linearly to 0 (as in BERT, Devlin et al.
2019), gradient-norm clipping, validation accuracy after each epoch, test accuracy at the end. Same seed,
same numbers (on the same machine and thread count).

Budgets (``Budget.lesson()``, measured on 2 CPU threads, MiniLM, batch 32 x <=64 tokens): 2,000 training
examples, 2 epochs = 126 steps; a frozen-encoder step ~0.4 s, a full fine-tuning step ~1 s, so one run takes
1-3 minutes. ``MINIPEFT_FAST=1`` selects ``Budget.fast()`` (tiny data, same code paths) for CI.
Learning rates of the baselines: full fine-tuning 1e-4, head only 3e-3 (see ``minipeft.lab.compare``).
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..api import stored_count
from ..assets import load_tokenizer

FAST_ENV = "MINIPEFT_FAST"
POOLINGS = ("mean", "cls")


def is_fast() -> bool:
    """True when the environment asks for the CI budget (``MINIPEFT_FAST=1``)."""
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes")


def _is_whole(value, minimum: int) -> bool:
    """An int (not a bool) >= minimum."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_finite(value) -> bool:
    """A real number (int or float, not a bool) that is neither nan nor ±inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_lr(lr) -> None:
    """``lr`` must be a finite number > 0: AdamW's peak learning rate (inf or nan turns every weight into nan)."""
    if not (_is_finite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0 (AdamW's peak learning rate), got {lr!r}")


# ---- the model -----------------------------------------------------------------------------------------------

class SequenceClassifier(nn.Module):
    """logits = W · pool(encoder(x)) + b, pool = masked mean over real tokens (or the first, [CLS], token)."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} not supported; allowed: {POOLINGS}")
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.hidden_size, num_labels)

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def pool(self, hidden, attention_mask):
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, d)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids, attention_mask, token_type_ids)  # (B, T, d)
        return self.head(self.dropout(self.pool(hidden, attention_mask)))  # (B, C)


# ---- the budget ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)  # frozen: the checks of __post_init__ hold for the budget's whole life
class Budget:
    """How much data and compute one run gets. ``None`` in max_train / max_eval means the whole split."""
    max_train: int | None = 2000
    max_eval: int | None = 500      # validation keeps its first max_eval examples
    max_test: int | None = None     # test: the whole split (sentiment 1,000, subjectivity and topic 400)
    epochs: int = 2
    batch_size: int = 32
    max_length: int = 64            # tokens; longer texts are truncated
    warmup_ratio: float = 0.1       # fraction of the steps with a linearly rising learning rate
    grad_clip: float = 1.0          # max global gradient norm
    weight_decay: float = 0.01      # AdamW decay on weight matrices (not on biases / LayerNorms)
    eval_batch_size: int = 64
    timing_warmup_steps: int = 3    # first steps left out of sec_per_step

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if not _is_whole(getattr(self, name), minimum=1):
                raise ValueError(f"Budget.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_train", "max_eval", "max_test"):
            v = getattr(self, name)
            if v is not None and not _is_whole(v, minimum=1):
                raise ValueError(f"Budget.{name} must be a positive integer or None (all), got {v!r}")
        if not _is_whole(self.timing_warmup_steps, minimum=0):
            raise ValueError(f"Budget.timing_warmup_steps must be an integer >= 0, got {self.timing_warmup_steps!r}")
        if not (_is_finite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"Budget.warmup_ratio must be in [0, 1) (a fraction of the steps), "
                             f"got {self.warmup_ratio!r}")
        if not (_is_finite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"Budget.grad_clip must be a finite number > 0 (the max global gradient norm), "
                             f"got {self.grad_clip!r}")
        if not (_is_finite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"Budget.weight_decay must be a finite number >= 0 (AdamW's decoupled decay), "
                             f"got {self.weight_decay!r}")

    @classmethod
    def lesson(cls) -> "Budget":
        """The lessons' budget: 2,000 examples x 2 epochs at batch 32 (126 steps), 500 validation, whole test."""
        return cls()

    @classmethod
    def fast(cls) -> "Budget":
        """CI's budget: the same code paths (2 epochs, warm-up, eval, test) on a few batches."""
        return cls(max_train=64, max_eval=32, max_test=32, epochs=2, batch_size=16, max_length=32, timing_warmup_steps=1)

    @classmethod
    def from_env(cls) -> "Budget":
        """``fast()`` when ``MINIPEFT_FAST=1``, else ``lesson()``."""
        return cls.fast() if is_fast() else cls.lesson()

    @classmethod
    def generation(cls) -> "Budget":
        """The lessons' budget on a generation task (``headline``): 160 articles x 1 epoch at batch 8 (20 steps),
        the body cut to 128 tokens (``max_length``), 32 validation articles, the whole test split (300)."""
        from .generation_tasks import BODY_TOKENS

        return cls(max_train=160, max_eval=32, max_test=None, epochs=1, batch_size=8, max_length=BODY_TOKENS,
                   eval_batch_size=16, timing_warmup_steps=1)

    @classmethod
    def generation_fast(cls) -> "Budget":
        """CI's budget on a generation task: the same code paths on a handful of short articles."""
        return cls(max_train=8, max_eval=4, max_test=4, epochs=1, batch_size=4, max_length=24, eval_batch_size=4,
                   timing_warmup_steps=1)

    @classmethod
    def for_generation(cls, fast: bool | None = None) -> "Budget":
        """``generation_fast()`` when ``fast`` (default: ``MINIPEFT_FAST=1``), else ``generation()``; a task's budget
        whatever its kind: ``minipeft.lab.kinds.kind_of(task).budget()``."""
        return cls.generation_fast() if (is_fast() if fast is None else fast) else cls.generation()


# ---- counting ------------------------------------------------------------------------------------------------

def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter *elements* (not tensors, not buffers); shared tensors counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def backbone_parameter_count(backbone: nn.Module) -> int:
    """The denominator of every percentage: the pretrained backbone alone, nothing attached.

    A minipeft backbone is rebuilt from its config on the meta device (exact, no memory); any other module is
    counted as it is (so count it before attaching anything).
    """
    from ..backbones.contract import Backbone

    return backbone.bare_parameter_count() if isinstance(backbone, Backbone) else count_parameters(backbone)


def training_state_bytes(total_params: int, trainable_params: int, bytes_per_value: int = 4) -> int:
    """Memory of weights + gradients + AdamW state, activations excluded (Kingma & Ba 2015, Alg. 1).

    Every parameter is stored once; each trainable one also has a gradient and AdamW's two moments m and v:
    bytes = b · (N_total + 3 · N_trainable).
    """
    if not 0 <= trainable_params <= total_params:
        raise ValueError(f"need 0 <= trainable_params <= total_params, got {trainable_params} and {total_params}")
    return bytes_per_value * (total_params + 3 * trainable_params)


# ---- the result record ---------------------------------------------------------------------------------------

@dataclass
class Result:
    """Everything one run produced; ``to_dict()`` is plain JSON."""
    task: str
    method: str
    config: dict
    seed: int
    lr: float
    budget: dict
    val_acc: list[float]            # one per epoch, in ``metric``
    test_acc: float                 # in ``metric`` (accuracy, or ROUGE-L F1 on a generation task)
    losses: list[float]             # training loss per step
    steps: int
    sec_per_step: float             # median over the steps after budget.timing_warmup_steps
    train_seconds: float            # wall time of the whole run, evaluation included
    peak_memory_mb: float
    memory_measure: str             # what peak_memory_mb is (it differs between CPU and CUDA)
    train_state_mb: float           # weights + grads + AdamW state by formula (training_state_bytes)
    trainable_params: int
    stored_params: int
    total_params: int
    backbone_params: int            # the frozen backbone: the denominator of the percentages
    trainable_pct: float
    stored_pct: float
    device: str
    versions: dict = field(default_factory=dict)
    test_predictions: list = field(default_factory=list)  # per test example, in split order (paired tests):
    #                                                       a label, or a generated text on a generation task
    metric: str = "accuracy"        # what val_acc and test_acc measure: "accuracy", or "rougeL" (ROUGE-L F1)
    test_scores: dict = field(default_factory=dict)  # a generation task's ROUGE-1/2/L on the test split

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        names = {f.name for f in fields(cls)}
        missing = names - set(d) - {"versions", "test_predictions", "metric", "test_scores"}  # newer fields
        if missing:
            raise ValueError(f"not a Result record: missing fields {sorted(missing)}")
        return cls(**{k: d[k] for k in names if k in d})


def versions() -> dict:
    import datasets
    import transformers

    from .. import __version__

    return {"minipeft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}", "threads": torch.get_num_threads()}


# ---- the loop ------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def _tokenizer(path=None):
    return load_tokenizer(path)


def task_data(task, budget: Budget, num_labels: int):
    """``task``'s train / validation / test splits (a task name is loaded within ``budget``'s limits; other splits
    are left out), once ``tasks.check_task_data`` has checked them and their number of classes is the head's."""
    from datasets import ClassLabel, DatasetDict

    from .tasks import SPLITS, check_task_data, load_task

    dd = load_task(task, budget.max_train, budget.max_eval, budget.max_test) if isinstance(task, str) else task
    n_classes = check_task_data(dd)
    if n_classes != num_labels:
        inferred = "" if isinstance(dd["train"].features["label"], ClassLabel) else (
            " (plain integer labels: the largest + 1; a ClassLabel feature states the classes)")
        raise ValueError(f"task has {n_classes} labels{inferred} but the model's head has {num_labels} outputs")
    return DatasetDict({split: dd[split] for split in SPLITS})


def _loaders(dd, budget: Budget, seed: int, tokenizer):
    from torch.utils.data import DataLoader

    from .tasks import collate, tokenize

    pad = tokenizer.pad_token_id or 0
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()  # no "Map: 100%" noise in notebooks
    try:
        data = tokenize(dd, tokenizer, budget.max_length)
    finally:
        if was_enabled:
            enable_progress_bar()
    fn = lambda batch: collate(batch, pad)  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(data["train"], batch_size=budget.batch_size, shuffle=True, generator=g, collate_fn=fn)
    evals = {s: DataLoader(data[s], batch_size=budget.eval_batch_size, collate_fn=fn) for s in ("validation", "test")}
    return train_dl, evals


def linear_warmup_decay(warmup: int, total: int):
    """lr multiplier: s / warmup during warm-up, then (total - s) / (total - warmup) down to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> float:
    """Accuracy of argmax predictions over a loader."""
    predictions, labels = predict(model, loader, device)
    return sum(p == y for p, y in zip(predictions, labels)) / max(1, len(labels))


@torch.no_grad()
def predict(model: nn.Module, loader, device) -> tuple[list[int], list[int]]:
    """Argmax predictions and labels over a loader, in its order (for paired tests on the same examples)."""
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        predictions += logits.argmax(-1).cpu().tolist()
        labels += batch["labels"].tolist()
    model.train(was_training)
    return predictions, labels


def train(model: SequenceClassifier, task, lr: float, budget: Budget | None = None, seed: int = 0,
          method: str = "", config: dict | None = None, quiet: bool = False, tokenizer=None,
          device=None, distributed=None) -> Result:
    """Train ``model``'s trainable parameters on ``task`` (a task name, or a DatasetDict with the splits and columns
    of ``tasks.check_task_data``); return a Result.

    Seed first, build the model after ``seed_everything(seed)`` (the head's init is then seeded too);
    ``minipeft.lab.compare.build_model`` does both. ``distributed`` (``minipeft.lab.distributed.setup()``): this process's
    part of a DistributedDataParallel run (its slice of each batch of ``budget.batch_size``) and/or bf16 autocast.
    """
    params = trainable_parameters(model, lr)  # everything is checked before the model is touched
    budget = check_budget(Budget.from_env() if budget is None else budget, model)
    dd = task_data(task, budget, model.num_labels)
    seed_everything(seed)
    device = torch.device(device) if device is not None else default_device()
    from ..interop import tokenizer_dir  # the encoder's own tokenizer, never another model's
    train_dl, evals = _loaders(dd, budget, seed, tokenizer or _tokenizer(tokenizer_dir(model.encoder)))
    task_name = task if isinstance(task, str) else getattr(task, "name", "custom")

    model.to(device).train()
    net = model  # what the loop calls: the model, or its DDP / autocast wrapper
    if distributed is not None:
        train_dl, net = distributed.prepare(train_dl, model, seed)
    opt, sched = make_optimizer(params, lr, budget, total_steps=budget.epochs * len(train_dl))
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        losses, step_times, val_acc = run_epochs(net, params, opt, sched, train_dl,
                                                 lambda: evaluate(net, evals["validation"], device), budget, device,
                                                 desc=f"{method or 'train'} on {task_name}", quiet=quiet)
    if distributed is not None:
        losses = distributed.global_losses(losses)
    test_predictions, test_labels = predict(net, evals["test"], device)
    test_acc = sum(p == y for p, y in zip(test_predictions, test_labels)) / max(1, len(test_labels))

    timed = step_times[budget.timing_warmup_steps:] or step_times
    n_total, n_train = count_parameters(model), count_parameters(model, trainable_only=True)
    n_stored, n_backbone = stored_count(model), backbone_parameter_count(model.encoder)
    return Result(task=task_name, method=method, config=dict(config or {}), seed=seed, lr=lr,
                  budget=asdict(budget), val_acc=val_acc, test_acc=test_acc, losses=losses, steps=len(losses),
                  sec_per_step=statistics.median(timed), train_seconds=time.perf_counter() - start,
                  peak_memory_mb=mem.peak_mb, memory_measure=mem.measure,
                  train_state_mb=training_state_bytes(n_total, n_train) / 2**20,
                  trainable_params=n_train, stored_params=n_stored, total_params=n_total,
                  backbone_params=n_backbone, trainable_pct=100 * n_train / n_backbone,
                  stored_pct=100 * n_stored / n_backbone, device=str(device), versions=versions(),
                  test_predictions=test_predictions)


def check_budget(budget, model: nn.Module) -> Budget:
    """``budget``, once it is a Budget whose ``max_length`` fits the encoder's positions (when it states them)."""
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a minipeft.lab.train.Budget (e.g. Budget.fast()), got {type(budget).__name__}")
    cfg = getattr(getattr(model, "encoder", None), "cfg", None)
    if hasattr(cfg, "max_position") and hasattr(cfg, "position_offset"):
        positions = cfg.max_position - cfg.position_offset
        if budget.max_length > positions:
            raise ValueError(f"Budget.max_length {budget.max_length} exceeds the encoder's {positions} positions; "
                             f"allowed: 1..{positions}")
    return budget


def trainable_parameters(model: nn.Module, lr: float) -> list[nn.Parameter]:
    """The parameters ``train`` optimises, after checking the model and the learning rate."""
    if not isinstance(model, SequenceClassifier):
        raise TypeError(f"train() needs a SequenceClassifier (backbone + head), got {type(model).__name__}")
    check_lr(lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: every requires_grad is False")
    return params


def make_optimizer(params, lr: float, budget: Budget, total_steps: int):
    """AdamW (decay on weight matrices and embeddings, not on biases / norm gains) and the warm-up/decay schedule."""
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": budget.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    warmup = math.ceil(budget.warmup_ratio * total_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(warmup, total_steps))


def classification_loss(model: nn.Module, batch: dict, device) -> torch.Tensor:
    """Cross-entropy of the head's logits against the labels (mean over the batch)."""
    logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return F.cross_entropy(logits, batch["labels"].to(device))


def run_epochs(model, params, opt, sched, train_dl, validate, budget: Budget, device, desc: str = "train",
               quiet: bool = False, loss_fn=classification_loss, metric: str = "val_acc"
               ) -> tuple[list[float], list[float], list[float]]:
    """The one training loop, of every task kind: ``budget.epochs`` passes over ``train_dl`` minimising
    ``loss_fn(model, batch, device)`` (+ the attached methods' regularizers), clipping, AdamW and schedule steps;
    ``validate()`` after each epoch. Returns the loss and seconds of every step and the validation scores."""
    from tqdm import tqdm

    from ..core import regularizers

    extra = regularizers(model)  # method-specific loss terms (AdapterFusion's λ‖I − V‖²_F); none for most methods
    losses, step_times, val_scores = [], [], []
    total = budget.epochs * len(train_dl)
    bar = tqdm(total=total, disable=quiet, desc=desc, mininterval=2.0,
               miniters=max(1, total // 20))  # at most ~20 updates: notebooks store every one
    for _ in range(budget.epochs):
        for batch in train_dl:
            t0 = time.perf_counter()
            loss = loss_fn(model, batch, device)
            objective = loss + sum(m.regularization() for m in extra if m.active) if extra else loss
            objective.backward()  # losses records the task loss alone
            torch.nn.utils.clip_grad_norm_(params, budget.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # .item() synchronises CUDA, so the timing is honest
            step_times.append(time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        val_scores.append(validate())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **{metric: f"{val_scores[-1]:.3f}"})
    bar.close()
    return losses, step_times, val_scores


# ---- peak memory ---------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory during a block. CUDA: ``torch.cuda.max_memory_allocated`` (tensors only).

    CPU: the peak rise of the process's resident set size (RSS) over its value at the start, sampled every
    50 ms from /proc (Linux); freed memory is first handed back to the OS (glibc ``malloc_trim``) so an
    earlier run in the same process inflates it less. It includes activations, gradients and optimiser state,
    not the weights that were already loaded. Elsewhere: the process's lifetime peak RSS (``ru_maxrss``).
    """

    def __init__(self, device):
        self.device, self.peak_mb, self.measure = torch.device(device), 0.0, ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.measure = "cuda max_memory_allocated (MiB)"
            return self
        _malloc_trim()
        self._base = _rss_bytes()
        if self._base is None:
            self.measure = "cpu peak RSS of the process (MiB, ru_maxrss)"
            return self
        self.measure = "cpu peak RSS rise during training (MiB)"
        self._peak, self._stop = self._base, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._base is None:
            import resource
            import sys

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mb = kib / 2**20 if sys.platform == "darwin" else kib / 2**10
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, _rss_bytes()) - self._base) / 2**20
        return False


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
