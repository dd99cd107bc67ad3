"""Training on several processes (minipeft.lab.distributed): 2-process DDP equals 1 process at the same global batch.

The 2-process run uses gloo on CPU, spawned with ``torch.multiprocessing`` (1 thread per process). Data order:
every rank draws the one-process permutation (same seeded generator, same DataLoader) and takes its contiguous
slice of each global batch, so the global batches are exactly the one-process ones; the one-process reference is
plain ``train()`` with no change. 37 training examples at batch 8 make the last batch of each epoch 5 = 3 + 2
examples: the weighted all-reduce (Σ_r n_r/N · g_r) must make the uneven split exact too.

Dropout is switched off for the equality (p = 0 in the tiny encoder's config, its attention, the head and every
``nn.Dropout``): the one-process dropout masks of a batch cannot be drawn again by two processes that each see
half of it (in real runs rank r > 0 draws its own masks from seed + r).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from minipeft.core import RECIPES
from minipeft.lab.distributed import Distributed, ShardedBatchSampler, resolve_device, setup, teardown
from minipeft.lab.train import Budget, count_parameters, train

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "houlsby", "mam")  # LoRA; bottleneck adapters; MAM = prefix (with its MLP) + scaled parallel
BUDGET = Budget(max_train=37, max_eval=8, max_test=16, epochs=2, batch_size=8, max_length=24, timing_warmup_steps=1)


def tiny_model(method: str, seed: int = 0):
    """A 2-layer random encoder (d=32) with the recipe's adapter and a head, every dropout off."""
    from minipeft.backbones.encoder import Encoder, EncoderConfig
    from minipeft.lab.compare import build_model

    torch.manual_seed(seed)
    encoder = Encoder(EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, dropout=0.0,
                                    attention_dropout=0.0, name="tiny"))
    model = build_model(method, "sentiment", seed, encoder=encoder)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def run_one(method: str, distributed=None) -> dict:
    model = tiny_model(method)
    result = train(model, "sentiment", RECIPES[method].lr, BUDGET, seed=0, method=method, quiet=True, device="cpu",
                   distributed=distributed)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
            "n_trainable": count_parameters(model, trainable_only=True), "losses": result.losses,
            "steps": result.steps, "test_acc": result.test_acc, "val_acc": result.val_acc,
            "reduced": distributed.reduced_numel if distributed is not None else 0}


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    d = setup("cpu")
    try:
        runs = {}
        for method in METHODS:
            d.reduced_numel = 0
            runs[method] = run_one(method, d)
        if rank == 0:
            torch.save(runs, out)
    finally:
        teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same recipes trained by 1 process (here) and by 2 (forked after it: they inherit the imports, the
    tokenizer and the data, which is most of the time), same seed, same global batch."""
    out = tmp_path_factory.mktemp("ddp") / "two.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = {m: run_one(m) for m in METHODS}
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return one, torch.load(out)


def max_weight_difference(one: dict, two: dict) -> float:
    return max(float((one["state"][k] - two["state"][k]).abs().max()) for k in one["state"])


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process(one_and_two, method):
    one, two = one_and_two[0][method], one_and_two[1][method]
    assert one["steps"] == two["steps"] == BUDGET.epochs * 5  # ceil(37 / 8) = 5 global batches per epoch
    moved = max(float((one["state"][k] - tiny_model(method).state_dict()[k]).abs().max()) for k in one["trainable"])
    assert moved > 5e-3, "the adapters barely moved: the comparison would prove nothing"
    diff = max_weight_difference(one, two)
    print(f"{method}: max |w(2 processes) - w(1 process)| after {one['steps']} steps = {diff:.2e}")
    assert diff < 1e-5
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-5  # the global batch's loss
    assert one["test_acc"] == two["test_acc"] and one["val_acc"] == two["val_acc"]


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_are_all_reduced(one_and_two, method):
    one, two = one_and_two[0][method], one_and_two[1][method]
    # each step all-reduces every trainable element once, and nothing else (the frozen encoder is not registered)
    assert two["reduced"] == two["steps"] * one["n_trainable"]
    assert one["n_trainable"] < 0.5 * sum(v.numel() for v in one["state"].values())


def test_sharded_batches_cover_the_global_batch_in_order():
    batches = [list(range(8)), list(range(8, 13))]
    shards = [list(ShardedBatchSampler(batches, rank, 2)) for rank in (0, 1)]
    assert shards[0] == [[0, 1, 2, 3], [8, 9, 10]] and shards[1] == [[4, 5, 6, 7], [11, 12]]
    s = ShardedBatchSampler(batches, 1, 2)
    list(s)
    assert s.local_sizes == [4, 2] and s.global_sizes == [8, 5] and s.weight == 2 / 5
    with pytest.raises(ValueError, match="a batch of 1 examples cannot be split over 2 processes"):
        list(ShardedBatchSampler([[0]], 0, 2))


def test_bad_input_is_explained():
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(30)), batch_size=15)
    with pytest.raises(ValueError, match="batch size 15 is not divisible by the world size 2"):
        Distributed(rank=0, world_size=2).prepare(loader, nn.Linear(2, 2), seed=0)
    with pytest.raises(ValueError, match="device 'tpu' not supported"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda, but no GPU is usable here"):
            resolve_device("cuda")


def cli_error(argv, capsys) -> str:
    from minipeft.lab.distributed import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code) + capsys.readouterr().err


def test_cli_errors_are_clear(monkeypatch, capsys):
    assert "unknown method 'nope'; registered methods:" in cli_error(["--method", "nope"], capsys)
    assert "unknown task 'poems'" in cli_error(["--method", "lora", "--task", "poems"], capsys)
    if not torch.cuda.is_available():
        assert "--device cuda, but no GPU is usable here" in cli_error(["--method", "lora", "--device", "cuda"], capsys)
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():  # not started by torchrun
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert "start the processes with torchrun" in cli_error(["--method", "lora", "--fast"], capsys)


def test_bf16_autocast_trains_close_to_fp32(one_and_two):
    """--bf16 on CPU (the same Autocast wrapper as on CUDA): finite losses near the fp32 run's."""
    fp32 = one_and_two[0]["lora"]
    d = setup("cpu", bf16=True)
    r = train(tiny_model("lora"), "sentiment", RECIPES["lora"].lr, BUDGET, seed=0, quiet=True, device="cpu",
              distributed=d)
    assert all(torch.isfinite(torch.tensor(r.losses)))
    assert max(abs(a - b) for a, b in zip(r.losses, fp32["losses"])) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_path_fp32_matches_cpu_and_bf16_trains(one_and_two):
    """--device cuda: fp32 on the GPU gives the CPU's weights (within GPU rounding); --bf16 autocast trains."""
    cpu, lr = one_and_two[0]["lora"], RECIPES["lora"].lr
    d = setup("cuda")
    gpu = tiny_model("lora")
    r = train(gpu, "sentiment", lr, BUDGET, seed=0, quiet=True, device=d.device, distributed=d)
    diff = max(float((cpu["state"][k] - v.cpu()).abs().max()) for k, v in gpu.state_dict().items())
    assert diff < 1e-3, diff
    d16 = setup("cuda", bf16=True)
    r16 = train(tiny_model("lora"), "sentiment", lr, BUDGET, seed=0, quiet=True, device=d16.device, distributed=d16)
    assert all(torch.isfinite(torch.tensor(r16.losses))) and r16.device.startswith("cuda")
    assert max(abs(a - b) for a, b in zip(r16.losses, r.losses)) < 0.05


@pytest.mark.skipif(os.environ.get("MINIPEFT_TORCHRUN") != "1", reason="set MINIPEFT_TORCHRUN=1: real MiniLM, "
                    "torchrun, 2 processes (~1 min on 2 cores)")
def test_torchrun_cli_smoke(tmp_path):
    """The README's command on the real MiniLM: 2 processes write one adapter, one head and one Result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "minipeft", "train",
           "--method", "lora", "--fast", "--max-train", "32", "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["world_size"] == 2 and run["backend"] == "gloo" and result["steps"] == 2
    from minipeft.api import WEIGHTS_FILE

    assert (tmp_path / "adapter" / WEIGHTS_FILE).is_file() and (tmp_path / "head.safetensors").is_file()
