"""Training on several processes: PyTorch DistributedDataParallel (DDP) over the adapter's parameters only.

    torchrun --nproc_per_node 2 -m minipeft train --method lora --task sentiment       # 2 processes, gloo (CPU)
    torchrun --nproc_per_node 4 -m minipeft train --method lora --device cuda --bf16   # 4 GPUs, NCCL

``setup()`` reads what ``torchrun`` puts in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and joins the process group: gloo on CPU, NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``). Without
those variables it is one process and nothing is initialised. ``train(..., distributed=setup())`` then

- gives every rank its contiguous slice of each *global* batch (``ShardedBatchSampler``). Every rank draws
  the very same permutation as a one-process ``train`` (same seeded generator, same DataLoader), so the
  global batches, and hence the updates, are those of one process with the same ``Budget.batch_size``.
  (torch's ``DistributedSampler`` would interleave ranks over its own permutation: a different order.)
- wraps the model in DDP. DDP registers only parameters with ``requires_grad`` for the gradient all-reduce,
  so the frozen backbone is never communicated; its initial broadcast is also restricted to the trainable
  tensors (every rank builds the same seeded model, the backbone is identical by construction).
- all-reduces each gradient bucket as Σ_r (n_r / N) · g_r (n_r = this rank's examples, N = the global batch):
  the exact mean over the global batch even when the last batch splits unevenly (DDP's default, the plain
  average over ranks, is that only when every rank holds as many examples).
- reports per-step losses of the global batch (Σ_r n_r · loss_r / N), so the Result is the one-process one.

Dropout: rank 0 keeps the seeded random stream of a one-process run; rank r > 0 reseeds with seed + r after
the model is built, so the ranks' dropout masks differ (the one-process masks cannot be reproduced exactly
across a split batch; the equality test switches dropout off).

Evaluation runs on every rank over the whole validation / test split (identical weights, identical numbers);
only rank 0 writes files. ``autocast="bf16"`` runs the forward passes under ``torch.autocast`` in bfloat16
(weights, gradients and AdamW state stay fp32), on CUDA or CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEVICES = ("auto", "cpu", "cuda")


class ShardedBatchSampler(Sampler):
    """This rank's contiguous slice of every batch of ``batch_sampler`` (the one-process batches).

    A global batch of N examples is cut into ``world_size`` consecutive parts whose sizes differ by at most one
    (the first N mod W ranks get one more). ``weight`` is this rank's share n_r / N of the batch just yielded.
    """

    def __init__(self, batch_sampler, rank: int, world_size: int):
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size
        self.weight, self.local_sizes, self.global_sizes = 1.0 / world_size, [], []

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            N, W = len(batch), self.world_size
            if N < W:
                raise ValueError(f"a batch of {N} examples cannot be split over {W} processes (the last batch of "
                                 "an epoch is max_train mod batch_size); choose max_train so that it has at least "
                                 f"{W} examples, or fewer processes")
            start = self.rank * (N // W) + min(self.rank, N % W)
            n = N // W + (self.rank < N % W)
            self.weight = n / N
            self.local_sizes.append(n)
            self.global_sizes.append(N)
            yield batch[start:start + n]


class Autocast(nn.Module):
    """Runs ``module``'s forward under ``torch.autocast(device_type, dtype)``; returns fp32 logits."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs).float()


def _weighted_allreduce(state: "Distributed", bucket):
    """DDP communication hook: g ← Σ_r (n_r / N) g_r, the mean gradient over the global batch."""
    buffer = bucket.buffer()
    buffer.mul_(state.sampler.weight)
    state.reduced_numel += buffer.numel()
    future = dist.all_reduce(buffer, async_op=True).get_future()
    return future.then(lambda f: f.value()[0])


@dataclass
class Distributed:
    """Where this process stands: rank, world size, its device, and the forward's autocast dtype (or None)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: torch.dtype | None = None
    sampler: ShardedBatchSampler | None = None
    reduced_numel: int = 0          # gradient elements all-reduced so far (the trainable ones, once per step)
    ddp: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def prepare(self, train_dl: DataLoader, model: nn.Module, seed: int) -> tuple[DataLoader, nn.Module]:
        """This rank's training loader (its slice of each global batch) and the module to call in the loop."""
        where = next(model.parameters()).device
        if where != self.device and not (where.type == self.device.type == "cuda" and self.device.index is None):
            raise ValueError(f"the model is on {where} but this process trains on {self.device}: pass "
                             "device=distributed.device to train()")
        net = Autocast(model, self.device.type, self.autocast) if self.autocast is not None else model
        if self.world_size == 1:
            return train_dl, net
        batch_size = train_dl.batch_sampler.batch_size
        if batch_size % self.world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the world size {self.world_size}: each "
                             f"process takes batch_size / world_size examples of every batch; choose a multiple "
                             f"of {self.world_size}")
        self.sampler = ShardedBatchSampler(train_dl.batch_sampler, self.rank, self.world_size)
        # the same generator object: the loader draws its base seed from it, then the permutation, as in 1 process
        train_dl = DataLoader(train_dl.dataset, batch_sampler=self.sampler, collate_fn=train_dl.collate_fn,
                              generator=train_dl.generator)
        if self.rank > 0:
            torch.manual_seed(seed + self.rank)  # this rank's own dropout masks (rank 0 keeps the 1-process stream)
        frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
        buffers = [n for n, _ in net.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, frozen + buffers)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(net, device_ids=ids)  # buffers ignored: none synced
        self.ddp.register_comm_hook(self, _weighted_allreduce)
        return train_dl, self.ddp

    def global_losses(self, losses: list[float]) -> list[float]:
        """Per-step loss of the global batch: Σ_r n_r · loss_r / N (this rank passes its own per-step losses)."""
        if self.world_size == 1:
            return losses
        sizes = torch.tensor(self.sampler.local_sizes[:len(losses)], dtype=torch.float64)
        total = torch.tensor(self.sampler.global_sizes[:len(losses)], dtype=torch.float64)
        weighted = (torch.tensor(losses, dtype=torch.float64) * sizes).to(self.device)
        dist.all_reduce(weighted)
        return (weighted.cpu() / total).tolist()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when there is a GPU, else CPU. ``cuda`` without a GPU is an error, not a silent CPU run."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} not supported; allowed: {DEVICES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device cuda, but no GPU is usable here (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False); use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"process with LOCAL_RANK {local_rank} needs a GPU of its own, but this machine has "
                         f"{torch.cuda.device_count()}; start at most that many processes per node")
    return torch.device("cuda", local_rank)


def setup(device: str = "auto", bf16: bool = False) -> Distributed:
    """Join the process group ``torchrun`` described in the environment (or stay one process without it)."""
    env = {k: os.environ.get(k) for k in ENV}
    world_size = int(env["WORLD_SIZE"] or 1)
    rank, local_rank = int(env["RANK"] or 0), int(env["LOCAL_RANK"] or 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad process environment: RANK={rank}, WORLD_SIZE={world_size}")
    dev = resolve_device(device, local_rank)
    if bf16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--bf16 needs a GPU with bfloat16 support; {torch.cuda.get_device_name(dev)} has none")
    d = Distributed(rank, world_size, local_rank, dev, torch.bfloat16 if bf16 else None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} but {missing} are not set: start the processes with torchrun")
        dist.init_process_group(d.backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    return d


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- python -m minipeft train ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    """``python -m minipeft train``: one registered recipe on one task; rank 0 writes the adapter and the Result."""
    import argparse
    import dataclasses
    import shlex
    import sys
    from pathlib import Path

    from ..api import save_adapter
    from .compare import Once
    from .kinds import KINDS, check_runs
    from .kinds.classification import KIND as CLASSIFICATION
    from ..core import RECIPES, get_recipe
    from .records import check_output_dir, write_json
    from .tasks import TASKS
    from .train import Budget

    ap = argparse.ArgumentParser(prog="python -m minipeft train", description=(
        "Train one registered method on one task, in this process or in every process torchrun started "
        "(DistributedDataParallel over the trainable parameters; gloo on CPU, NCCL on CUDA)."))
    ap.add_argument("--method", required=True, action=Once, help=f"a registered recipe: {', '.join(sorted(RECIPES))}")
    ap.add_argument("--task", default="sentiment", action=Once, help=f"one of {', '.join(sorted(TASKS))}")
    ap.add_argument("--seed", type=int, default=0, action=Once)
    ap.add_argument("--lr", type=float, default=None, action=Once, help="default: the recipe's learning rate")
    ap.add_argument("--fast", action="store_true", help="Budget.fast() (else Budget.from_env(): MINIPEFT_FAST)")
    for name in ("max_train", "max_eval", "max_test", "epochs", "batch_size", "max_length"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None, action=Once,
                        help="override the budget's " + name + (" (global: split over the processes)"
                                                                if name == "batch_size" else ""))
    ap.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when there is a GPU")
    ap.add_argument("--bf16", action="store_true", help="forward passes under torch.autocast in bfloat16")
    ap.add_argument("--out", default=None, action=Once,
                    help="output folder (default runs/train/<task>_<method>_seed<seed>)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    try:  # every check before any model is built; a refused command writes nothing
        recipe = get_recipe(args.method)
        if args.task not in CLASSIFICATION.tasks():  # train fits a classifier; compare trains every kind's tasks
            others = "; ".join(f"python -m minipeft compare trains the {k.name} tasks {k.tasks()}"
                               for k in KINDS.values() if k is not CLASSIFICATION)
            raise ValueError(f"unknown task {args.task!r} for train, which fits a classifier: one of {sorted(TASKS)} "
                             f"({others})")
        check_runs([recipe], [args.task])
        out = Path(args.out or f"runs/train/{args.task}_{recipe.name}_seed{args.seed}")
        check_output_dir(out, ("head.safetensors", "result.json", "run.json"))
        if recipe.make is not None:  # an adapter recipe: its folder in there
            check_output_dir(out / "adapter")
        budget = Budget.fast() if args.fast else Budget.from_env()
        budget = dataclasses.replace(budget, **{k: getattr(args, k) for k in (
            "max_train", "max_eval", "max_test", "epochs", "batch_size", "max_length") if getattr(args, k) is not None})
        d = setup(args.device, args.bf16)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        from .compare import build_model
        from .train import train

        model = build_model(recipe, args.task, args.seed)
        lr = args.lr if args.lr is not None else recipe.lr
        try:
            result = train(model, args.task, lr, budget, seed=args.seed, method=recipe.name, config=recipe.config,
                           quiet=args.quiet or not d.is_main, device=d.device, distributed=d)
        except ValueError as e:
            sys.exit(f"error: {e}")
        if d.is_main:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            if recipe.make is not None:  # an adapter recipe; the baselines (full, head) have no adapter to save
                save_adapter(model, recipe.name, out / "adapter")
            save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()},
                      str(out / "head.safetensors"))
            write_json(out / "result.json", result.to_dict())
            run = {"command": "python -m minipeft train " + shlex.join(sys.argv[2:] if argv is None else argv),
                   "world_size": d.world_size, "backend": d.backend if d.world_size > 1 else None,
                   "device": str(d.device), "autocast": str(d.autocast) if d.autocast else None,
                   "global_batch": budget.batch_size, "load_average": list(os.getloadavg())}
            write_json(out / "run.json", run)
            if not args.quiet:
                print(f"{recipe.name} on {args.task}, {d.world_size} process(es) on {d.device}: test acc "
                      f"{result.test_acc:.3f}, {result.sec_per_step:.3f} s/step -> {out}/", flush=True)
    finally:
        teardown()
    return 0
