"""Lesson 08 checks: can two methods be told apart on one test set, and what does training cost in memory?

The learner writes four small functions:

    mcnemar_p(correct_a, correct_b) -> p            exact two-sided McNemar test (McNemar 1947; Dietterich 1998):
                                                    b = #(A right, B wrong), c = #(A wrong, B right) over all
                                                    entries (one row (N,) or seeds × examples (S, N)),
                                                    p = min(1, 2·P(X ≤ min(b, c))), X ~ Binomial(b + c, 1/2)
    training_state_mb(total, trainable) -> MiB      fp32 weights + gradients + AdamW's two moments:
                                                    4·(N + 3·N_trainable) bytes / 2^20
    examples_needed(q, delta, alpha, power) -> n    (z_{1−α/2} + z_{power})² · q / δ²  (the normal approximation
                                                    of McNemar's test, discordant rate q, true difference δ)
    discordant_rate(pred_a, pred_b, labels) -> q    the fraction of (seed, example) pairs where exactly one of
                                                    the two methods is right

References: ``minipeft.lab.stats.mcnemar_exact``, ``minipeft.lab.train.training_state_bytes``, and the committed
``results/<task>/comparison.json`` (full fine-tuning and head-only are always in it). Each check compares on
fixed inputs and on the real results, and names the usual mistakes by the values they give.
"""
from __future__ import annotations

import math
import numbers
from statistics import NormalDist

import numpy as np

from ..exercises import ROOT
from ...lab.records import by_method, load_record
from ...lab.stats import correctness, mcnemar_exact
from ...lab.train import training_state_bytes
from . import call, fail, passed

TASKS = ("question", "topic", "sentiment")
MIB = 2**20


# ---- the committed results -----------------------------------------------------------------------------------

def results_path(task: str = "question"):
    return ROOT / "results" / task / "comparison.json"


def load_runs(task: str = "question") -> tuple[dict, list[int]]:
    """(method -> runs sorted by seed, test labels) of ``results/<task>/comparison.json``."""
    path = results_path(task)
    if not path.exists():
        fail("results", f"{path.relative_to(ROOT)} is missing: it is written by `python -m minipeft compare` "
                        "(see lesson 08).")
    record = load_record(path)
    return by_method(record["results"]), list(record["test_labels"])


def paired(runs: dict, a: str, b: str, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Predictions and 0/1 correctness (S, N) of methods ``a`` and ``b`` on the seeds both have."""
    ref = {r.seed: r for r in runs[b]}
    pairs = [(r, ref[r.seed]) for r in runs[a] if r.seed in ref]
    pa = np.array([r.test_predictions for r, _ in pairs])
    pb = np.array([s.test_predictions for _, s in pairs])
    return pa, pb, correctness(pa, labels), correctness(pb, labels)


def _number(name: str, got, where: str, what: str) -> float:
    if isinstance(got, (tuple, list, np.ndarray)) and np.size(got) != 1:
        fail(name, f"returned {type(got).__name__} {got!r:.80} ({where}): return one number, {what}.")
    if isinstance(got, np.ndarray):
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        fail(name, f"returned {got!r:.80} ({where}): return one number, {what}.")
    got = float(got)
    if math.isnan(got):
        fail(name, f"returned nan ({where}): {what} is always a finite number here.")
    return got


def _close(got: float, want: float, rel: float, absolute: float = 0.0) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=absolute)


def _attempt(name: str, fn, args: tuple, where: str, what: str, hint: str, kwargs: dict | None = None):
    """(the learner's number, None) or (None, the failure message); NotImplementedError passes through."""
    try:
        return _number(name, call(name, fn, *args, hint=hint, **(kwargs or {})), where, what), None
    except AssertionError as e:
        return None, str(e)


def _judge(name: str, seen: list, hints: dict, rel: float, absolute: float, otherwise: str, special=None) -> None:
    """``seen``: (where, got, want, mistakes, error) per case, in order. Fail at the first case that raised or is
    wrong: with its error, with ``special(where, got, want)`` if that has something to say, or naming the mistake
    that gives the learner's numbers on every case that ran (failing that, on this case)."""
    def matches(value, got):
        return value is not None and math.isfinite(value) and _close(got, value, rel, absolute)

    for where, got, want, mistakes, error in seen:
        if error is not None:
            raise AssertionError(error)
        if _close(got, want, rel, absolute):
            continue
        said = special(where, got, want) if special else None
        if said:
            fail(name, f"gave {got:.6g} ({where}): {said}")
        named = [m for m, v in mistakes.items() if matches(v, got) and not _close(v, want, rel, absolute)]
        everywhere = [m for m in named if all(s[4] is not None or s[3][m] is None or matches(s[3][m], s[1])
                                              for s in seen)]
        said = f"gave {got:.6g} ({where}), expected {want:.6g}"
        if named:
            fail(name, f"{said}: {hints[(everywhere or named)[0]]}")
        fail(name, f"{said}. {otherwise}")


# ---- 1. the exact McNemar test ---------------------------------------------------------------------------------

def _tail(k: int, n: int) -> float:
    """P(X ≤ k), X ~ Binomial(n, 1/2), exactly (0 for k < 0)."""
    if k < 0:
        return 0.0
    term, total = 1, 1  # C(n, 0); C(n, i) = C(n, i − 1)·(n − i + 1)/i, exact integers
    for i in range(1, min(k, n) + 1):
        term = term * (n - i + 1) // i
        total += term
    return total / 2**n


def _normal_p(b: int, c: int, correction: float) -> float | None:
    """The chi-square (1 degree of freedom) approximation: z = (|b − c| − correction) / √(b + c)."""
    if b + c == 0:
        return None
    z = max(abs(b - c) - correction, 0) / math.sqrt(b + c)
    return math.erfc(z / math.sqrt(2))


def _exact(b: int, c: int) -> float:
    return min(1.0, 2 * _tail(min(b, c), b + c)) if b + c else 1.0


def mcnemar_mistakes(a: np.ndarray, bb: np.ndarray) -> dict[str, float | None]:
    """p-values of the usual mistakes, for the 0/1 outcomes ``a`` and ``bb`` (same shape)."""
    a2, b2 = np.atleast_2d(a), np.atleast_2d(bb)
    b, c = int(((a2 == 1) & (b2 == 0)).sum()), int(((a2 == 0) & (b2 == 1)).sum())
    both, neither = int(((a2 == 1) & (b2 == 1)).sum()), int(((a2 == 0) & (b2 == 0)).sum())
    n, k, total = b + c, min(b, c), a2.size
    per_seed = [_exact(int(((r == 1) & (s == 0)).sum()), int(((r == 0) & (s == 1)).sum())) for r, s in zip(a2, b2)]
    return {
        "not_clipped": 2 * _tail(k, n),
        "one_sided": _tail(k, n),
        "chi2": _normal_p(b, c, 0.0),
        "chi2_corrected": _normal_p(b, c, 1.0),
        "point": min(1.0, 2 * math.comb(n, k) / 2**n),
        "strict": min(1.0, 2 * _tail(k - 1, n)),
        "upper_tail": min(1.0, 2 * (1 - _tail(k - 1, n))),
        "used_b": min(1.0, 2 * _tail(b, n)),
        "used_c": min(1.0, 2 * _tail(c, n)),
        "all_examples": min(1.0, 2 * _tail(k, total)),
        "concordant": _exact(both, neither),
        "marginals": _exact(int(a2.sum()), int(b2.sum())),
        "per_seed_mean": float(np.mean(per_seed)) if len(per_seed) > 1 else None,
        "first_seed": per_seed[0] if len(per_seed) > 1 else None,
    }


MCNEMAR_HINTS = {
    "not_clipped": "that is above 1. Doubling the smaller tail can overshoot when b and c are close; a p-value is "
                   "a probability: clip it, min(1, 2·P(X ≤ min(b, c))).",
    "one_sided": "that is half the answer: a one-sided p, the probability of a split at least this lopsided in one "
                 "direction only. The test is two-sided (either method could be the better one): double the tail "
                 "(and clip at 1).",
    "chi2": "that is the chi-square (normal) approximation, χ² = (b − c)²/(b + c). It is close for large b + c but "
            "wrong for small ones (b = 1, c = 6 gives 0.059 instead of the exact 0.125): sum the binomial "
            "probabilities exactly.",
    "chi2_corrected": "that is the chi-square approximation with continuity correction, (|b − c| − 1)²/(b + c): "
                      "close, but not exact for small b + c. Sum the binomial probabilities exactly.",
    "point": "that is 2·P(X = min(b, c)), one term only: the p-value is the whole tail, P(X ≤ min(b, c)), the "
             "probability of a split at least as lopsided as the one seen.",
    "strict": "the tail leaves out the observed split itself: it is P(X ≤ min(b, c)), with ≤, not <.",
    "upper_tail": "that is the wrong tail, P(X ≥ min(b, c)): the p-value is the probability of a split at least as "
                  "lopsided as the observed one, P(X ≤ min(b, c)) (doubled).",
    "used_b": "the tail is taken at b whatever its size: take it at the smaller of the two discordant counts, "
              "min(b, c) (then swapping A and B gives the same p, as it must).",
    "used_c": "the tail is taken at c whatever its size: take it at the smaller of the two discordant counts, "
              "min(b, c) (then swapping A and B gives the same p, as it must).",
    "all_examples": "the binomial runs over all examples: under 'no difference' only the discordant pairs are a "
                    "coin flip, so X ~ Binomial(b + c, 1/2), not Binomial(N, 1/2). Examples both got right (or both "
                    "wrong) carry no information about which is better.",
    "concordant": "those are the concordant counts (both right, both wrong): McNemar's test uses the discordant "
                  "ones, b = #(A right, B wrong) and c = #(A wrong, B right).",
    "marginals": "those are the two accuracies' counts (#A right, #B right), which ignores the pairing: count the "
                 "examples where exactly one of the two is right, b = #(A right, B wrong), c = #(A wrong, B right).",
    "per_seed_mean": "that is the mean of one p-value per seed: count b and c over all seeds and examples (pool the "
                     "seeds), then compute one p.",
    "first_seed": "only the first seed (row) was used: count b and c over all rows.",
}


def _outcomes(b: int, c: int, both: int, neither: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """0/1 outcomes with exactly these counts, in a shuffled order."""
    a = np.array([1] * b + [0] * c + [1] * both + [0] * neither)
    bb = np.array([0] * b + [1] * c + [1] * both + [0] * neither)
    order = rng.permutation(a.size)
    return a[order], bb[order]


def mcnemar_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(description, correct_a, correct_b): small hand-built counts first, then random pairs, then real ones."""
    rng = np.random.default_rng(8)
    cases = [(f"b={b}, c={c}, {both} both right, {neither} both wrong", *_outcomes(b, c, both, neither, rng))
             for b, c, both, neither in ((1, 6, 25, 8), (9, 2, 30, 9), (5, 5, 20, 10), (0, 0, 12, 3), (0, 4, 3, 1))]
    for n, acc_a, acc_b, agree in ((200, 0.8, 0.75, 0.85), (60, 0.6, 0.7, 0.5)):
        a = (rng.random(n) < acc_a).astype(np.int64)
        bb = np.where(rng.random(n) < agree, a, (rng.random(n) < acc_b).astype(np.int64))
        cases.append((f"random pair, {n} examples", a, bb))
    a = (rng.random((3, 80)) < 0.7).astype(np.int64)
    bb = np.where(rng.random((3, 80)) < 0.6, a, (rng.random((3, 80)) < 0.8).astype(np.int64))
    cases.append(("random pair, 3 seeds × 80 examples", a, bb))
    runs, labels = load_runs("question")
    _, _, full, head = paired(runs, "full", "head", labels)
    cases += [("results/question: full vs head, seed 0", full[0], head[0]),
              ("results/question: head vs full, seed 0", head[0], full[0]),
              (f"results/question: full vs head, {len(full)} seeds × {full.shape[1]} examples", full, head)]
    return cases


def check_mcnemar_p(fn) -> None:
    """``fn(correct_a, correct_b) -> p``: the exact two-sided McNemar p, as ``minipeft.lab.stats.mcnemar_exact``."""
    name = "mcnemar_p"
    seen, zero = [], set()
    for where, a, bb in mcnemar_cases():
        b, c, want = mcnemar_exact(a, bb)
        hint = ("correct_a and correct_b are 0/1 numpy arrays of the same shape, one row (N,) or seeds × examples "
                "(S, N): count b and c over all their entries.")
        if b + c == 0:
            zero.add(where)
            hint = ("Here the two are never discordant (b + c = 0): nothing tells them apart, and p = 1. " + hint)
        got, error = _attempt(name, fn, (a.copy(), bb.copy()), where, "the two-sided p-value", hint)
        seen.append((where, got, want, mcnemar_mistakes(a, bb), error))

    def special(where, got, want):
        if got > 1 + 1e-12:
            return MCNEMAR_HINTS["not_clipped"]
        if where in zero:
            return "when the two are never discordant (b + c = 0) nothing tells them apart, so p = 1."
        return None

    _judge(name, seen, MCNEMAR_HINTS, 1e-6, 1e-12,
           "Count b = #(A right, B wrong) and c = #(A wrong, B right); under 'no difference' each discordant pair "
           "goes either way with probability 1/2, so p = min(1, 2·P(X ≤ min(b, c))) with X ~ Binomial(b + c, 1/2).",
           special)
    passed(name, "equals minipeft.lab.stats.mcnemar_exact on 8 fixed pairs (b = 1, c = 6 among them) and on full vs "
                 "head from results/question (one seed, both orders, and all seeds pooled)")


# ---- 2. the memory of training ---------------------------------------------------------------------------------

def memory_mistakes(total: int, trainable: int) -> dict[str, float]:
    N, T = total, trainable
    return {
        "bytes": 4 * (N + 3 * T), "kib": 4 * (N + 3 * T) / 2**10, "gib": 4 * (N + 3 * T) / 2**30,
        "mb": 4 * (N + 3 * T) / 1e6, "fp16": 2 * (N + 3 * T) / MIB, "fp64": 8 * (N + 3 * T) / MIB,
        "bits": 32 * (N + 3 * T) / MIB,
        "adam_all": 4 * (3 * N + T) / MIB, "all_trainable": 16 * N / MIB,
        "two_per_trainable": 4 * (N + 2 * T) / MIB, "one_per_trainable": 4 * (N + T) / MIB,
        "double_trainable": 4 * (N + 4 * T) / MIB, "no_weights": 12 * T / MIB, "weights_only": 4 * N / MIB,
    }


MEMORY_HINTS = {
    "bytes": "that is in bytes: return MiB, bytes / 2^20.",
    "kib": "that is in KiB (bytes / 2^10): return MiB, bytes / 2^20.",
    "gib": "that is in GiB (bytes / 2^30): return MiB, bytes / 2^20.",
    "mb": "that is in MB (10^6 bytes): the course reports MiB, 2^20 = 1,048,576 bytes, the unit of train_state_mb "
          "and peak_memory_mb in the results.",
    "fp16": "that is 2 bytes per value (fp16 / bf16): here the weights, gradients and AdamW state are fp32, 4 bytes "
            "each.",
    "fp64": "that is 8 bytes per value (fp64): fp32 is 4 bytes.",
    "bits": "that counts 32 per value: 32 is the bits of an fp32 number; it takes 4 bytes.",
    "adam_all": "AdamW's two moments are counted for every parameter: the optimiser keeps m and v only for the "
                "parameters it updates (the trainable ones); the frozen weights are just stored.",
    "all_trainable": "that is 16 bytes for every parameter, as if everything were trained: gradients and AdamW "
                     "state exist only for the trainable parameters.",
    "two_per_trainable": "each trainable value is counted twice instead of three times on top of its weight: it has "
                         "a gradient AND two AdamW moments (m and v). One of the three is missing (often the "
                         "gradient) — or the trainable weights themselves are missing: N counts every parameter, "
                         "trainable ones too.",
    "one_per_trainable": "each trainable value carries one extra value instead of three: a gradient and two AdamW "
                         "moments (m and v).",
    "double_trainable": "the trainable weights are counted twice: N (total) already includes them; on top come "
                        "their gradient and the two moments, 3 values each.",
    "no_weights": "only the trainable state is counted: every weight is stored, frozen or not (N values).",
    "weights_only": "that is the weights alone: add, for each trainable value, its gradient and AdamW's two moments.",
}

MEMORY_CASES = ((22_713_216, 22_713_216, "MiniLM, everything trainable"),
                (22_713_216, 0, "MiniLM, nothing trainable"),
                (109_482_240, 294_912, "BERT-base + LoRA r = 8 on W_q, W_v"),
                (1_000_000, 10_000, "1 M parameters, 1% trainable"))


def check_training_state_mb(fn) -> None:
    """``fn(total_params, trainable_params) -> MiB`` of fp32 weights + gradients + AdamW state, as
    ``minipeft.lab.train.training_state_bytes`` / 2^20, and as the ``train_state_mb`` every result records."""
    name = "training_state_mb"
    hint = "total_params and trainable_params are ints (N and N_trainable)."
    cases = [(total, trainable, f"{what}: N = {total:,}, N_trainable = {trainable:,}",
              training_state_bytes(total, trainable) / MIB) for total, trainable, what in MEMORY_CASES]
    recorded = 0
    for task in TASKS:
        if not results_path(task).exists():
            continue
        runs, _ = load_runs(task)
        for method, rs in runs.items():
            for r in rs:
                cases.append((r.total_params, r.trainable_params, f"results/{task}: {method} seed {r.seed}, "
                              f"N = {r.total_params:,}, N_trainable = {r.trainable_params:,}", r.train_state_mb))
                recorded += 1
    if recorded == 0:
        fail(name, "found no results to compare with under results/<task>/comparison.json.")
    seen = []
    for total, trainable, where, want in cases:
        got, error = _attempt(name, fn, (total, trainable), where, "the memory in MiB", hint)
        seen.append((where, got, want, memory_mistakes(total, trainable), error))
    _judge(name, seen, MEMORY_HINTS, 1e-6, 0.0,
           "Count, in fp32 (4 bytes each): every weight once (N values), and for each trainable one a gradient and "
           "AdamW's two moments (3·N_trainable values); divide the bytes by 2^20.")
    passed(name, "equals minipeft.lab.train.training_state_bytes / 2^20 on 4 fixed sizes, and the train_state_mb "
                 "recorded for every run in results/")


# ---- 3. how many test examples a difference needs -------------------------------------------------------------

def z(p: float) -> float:
    return NormalDist().inv_cdf(p)


def needed(q: float, delta: float, alpha: float = 0.05, power: float = 0.80) -> float:
    """(z_{1−α/2} + z_{power})² · q / δ²."""
    return (z(1 - alpha / 2) + z(power)) ** 2 * q / delta**2


def needed_mistakes(q, delta, alpha, power) -> dict[str, float]:
    za, zb, za1 = z(1 - alpha / 2), z(power), z(1 - alpha)
    k = (za + zb) ** 2
    return {
        "hardcoded": needed(q, delta), "one_sided": (za1 + zb) ** 2 * q / delta**2,
        "no_power": za**2 * q / delta**2, "sum_squares": (za**2 + zb**2) * q / delta**2,
        "not_squared": (za + zb) * q / delta**2, "wrong_sign": (za - zb) ** 2 * q / delta**2,
        "delta_linear": k * q / delta, "delta_abs_linear": k * q / abs(delta), "q_squared": k * q**2 / delta**2,
        "sqrt_q": k * math.sqrt(q) / delta**2, "doubled": 2 * k * q / delta**2, "sqrt_n": math.sqrt(k * q) / abs(delta),
    }


NEEDED_HINTS = {
    "hardcoded": "that is the value for α = 0.05 and 80% power whatever alpha and power are: compute both z's "
                 "from the arguments.",
    "one_sided": "that uses z_{1−α} (one-sided, 1.645 for α = 0.05): the test is two-sided, so the critical value "
                 "is z_{1−α/2} (1.96).",
    "no_power": "that leaves out z_β: with n = z_{1−α/2}²·q/δ² the test detects the difference only half the time "
                "(50% power). Add the power quantile before squaring.",
    "sum_squares": "that is z_{1−α/2}² + z_{power}²: the two quantiles are added first, then squared, "
                   "(z_{1−α/2} + z_{power})².",
    "not_squared": "the sum of the two quantiles is not squared: n = (z_{1−α/2} + z_{power})²·q/δ².",
    "wrong_sign": "a quantile has the wrong sign: both are positive, z_{1−α/2} ≈ 1.96 and z_{power} = z_{0.80} ≈ "
                  "0.84; the lower quantiles z_{α/2} and z_{1−power} are negative.",
    "delta_linear": "δ is not squared: n grows with 1/δ² (the standard error shrinks like 1/√n).",
    "delta_abs_linear": "δ is not squared: n grows with 1/δ² (the standard error shrinks like 1/√n).",
    "q_squared": "q is squared: the variance of one example's difference is ≈ q (it is ±1 on a fraction q of the "
                 "examples, 0 elsewhere), so n is proportional to q, not q².",
    "sqrt_q": "that uses √q: the variance of one example's difference is ≈ q, and n is proportional to the variance.",
    "doubled": "that is doubled, as for two independent samples: in a paired comparison each example gives one "
               "difference, with variance ≈ q.",
    "sqrt_n": "that looks like √n: square it.",
}

NEEDED_CASES = ((0.10, 0.02, None, None), (0.05, 0.01, None, None), (0.30, 0.03, None, None),
                (0.02, -0.005, None, None), (0.10, 0.02, 0.01, 0.90), (0.20, 0.02, 0.10, 0.95))


def check_examples_needed(fn) -> None:
    """``fn(q, delta, alpha=0.05, power=0.80) -> n ≈ (z_{1−α/2} + z_{power})²·q/δ²`` (within 1%: rounded z's and a
    rounded-up n pass)."""
    name = "examples_needed"
    seen = []
    for q, delta, alpha, power in NEEDED_CASES:
        kwargs = {} if alpha is None else {"alpha": alpha, "power": power}
        where = f"q = {q}, delta = {delta}" + (f", alpha = {alpha}, power = {power}" if kwargs else "")
        got, error = _attempt(name, fn, (q, delta), where, "the number of test examples",
                              "it is called as examples_needed(q, delta) and examples_needed(q, delta, alpha=..., "
                              "power=...).", kwargs)
        a, p = alpha or 0.05, power or 0.80
        seen.append((where, got, needed(q, delta, a, p), needed_mistakes(q, delta, a, p), error))
    _judge(name, seen, NEEDED_HINTS, 0.01, 0.0,
           "n = (z_{1−α/2} + z_{power})²·q/δ², with z_p the standard normal quantile "
           "(statistics.NormalDist().inv_cdf(p)).")
    passed(name, f"(z_(1−α/2) + z_power)²·q/δ² on {len(NEEDED_CASES)} cases (α = 0.05 and 80% power: "
                 f"{needed(1, 1):.2f}·q/δ²; also α = 0.01, 0.10 and power 0.90, 0.95)")


def discordant_mistakes(pa, pb, labels) -> dict[str, float]:
    a, b = correctness(pa, labels), correctness(pb, labels)
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    q = float((a2 != b2).mean())
    return {
        "predictions_differ": float((np.asarray(pa) != np.asarray(pb)).mean()),
        "predictions_agree": float((np.asarray(pa) == np.asarray(pb)).mean()),
        "concordant": 1 - q, "b_only": float(((a2 == 1) & (b2 == 0)).mean()),
        "c_only": float(((a2 == 0) & (b2 == 1)).mean()), "net": abs(float(a2.mean() - b2.mean())),
        "count": float((a2 != b2).sum()), "per_example": float((a2 != b2).sum() / a2.shape[-1]),
        "first_seed": float((a2[0] != b2[0]).mean()),
    }


DISCORDANT_HINTS = {
    "predictions_differ": "that is the fraction where the two *predictions* differ: on a task with more than two "
                          "classes both methods can be wrong with different labels, and such a pair is concordant "
                          "(both wrong). Compare right/wrong, not the labels predicted.",
    "predictions_agree": "that is the fraction where the predictions agree: q is the fraction where exactly one of the "
                         "two methods is right.",
    "concordant": "that is the concordant fraction (both right or both wrong): q is its complement, exactly one right.",
    "b_only": "that counts only one direction (A right, B wrong): q = (b + c)/n counts both.",
    "c_only": "that counts only one direction (A wrong, B right): q = (b + c)/n counts both.",
    "net": "that is the accuracy difference, (b − c)/n: q is (b + c)/n, the pairs that disagree in either direction.",
    "count": "that is the count b + c: divide by the number of (seed, example) pairs.",
    "per_example": "the count over all seeds is divided by the number of examples only: divide by seeds × examples.",
    "first_seed": "only the first seed (row) was used: average over all of them.",
}


def discordant_cases():
    rng = np.random.default_rng(80)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    pa = np.array([0, 1, 2, 0, 1, 1, 2, 3, 0, 2])  # right ×3, wrong ×2, right ×4, wrong
    pb = np.array([0, 2, 2, 1, 0, 1, 3, 3, 0, 3])  # both wrong with different labels at 3 and 9
    cases = [("10 examples, 4 classes", pa, pb, labels)]
    y = rng.integers(0, 6, 150)
    pa = np.where(rng.random((3, 150)) < 0.7, y, rng.integers(0, 6, (3, 150)))
    pb = np.where(rng.random((3, 150)) < 0.6, pa, np.where(rng.random((3, 150)) < 0.5, y, rng.integers(0, 6, (3, 150))))
    cases.append(("random, 3 seeds × 150 examples, 6 classes", pa, pb, y))
    runs, labels = load_runs("question")
    fa, fb, _, _ = paired(runs, "full", "head", labels)
    cases += [("results/question: full vs head, seed 0", fa[0], fb[0], np.array(labels)),
              (f"results/question: full vs head, {len(fa)} seeds", fa, fb, np.array(labels))]
    return cases


def check_discordant_rate(fn) -> None:
    """``fn(pred_a, pred_b, labels) -> q``: the fraction of (seed, example) pairs where exactly one is right."""
    name = "discordant_rate"
    seen = []
    for where, pa, pb, labels in discordant_cases():
        got, error = _attempt(name, fn, (pa.copy(), pb.copy(), labels.copy()), where, "the fraction q",
                              "pred_a and pred_b are integer arrays (N,) or seeds × examples (S, N), labels (N,).")
        want = float((correctness(pa, labels) != correctness(pb, labels)).mean())
        seen.append((where, got, want, discordant_mistakes(pa, pb, labels), error))
    _judge(name, seen, DISCORDANT_HINTS, 1e-9, 1e-12,
           "q = (b + c) / (number of pairs): the fraction of (seed, example) pairs where one method is right and "
           "the other wrong.")
    passed(name, "the fraction of pairs with exactly one right, on 2 fixed cases (both wrong with different labels "
                 "among them) and on full vs head from results/question")
