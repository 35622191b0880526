"""The training harness: configs, evaluation, logs and checkpoints around the one loop
(:func:`figures.loop.run_loop`), for every model and optimizer of the paper.

``train(config)`` trains the model a :class:`RunConfig` names with SGD (Nesterov), Adam,
Entropy-SGD, Entropy-Adam, SGLD or SAM, evaluates at every *effective epoch*, logs to
JSON and CSV, and checkpoints so that an interrupted run resumes bit-identically.

Effective epochs (Sec. 5.2).  The harness counts gradient evaluations, i.e. closure calls.
With ``N`` mini-batches per pass over the training split, one effective epoch is ``N``
closure calls:

* SGD, Adam, SGLD call the closure once per step: an effective epoch is a data pass.
* Entropy-SGD / Entropy-Adam call it ``L`` times per step, each call drawing a *fresh*
  mini-batch from the stream (Alg. 1 line 4), so one of their "epochs" (``N`` outer steps,
  the unit of their LR schedule) is ``L`` effective epochs.
* SAM calls it twice per step on the *same* mini-batch (gradient at x, then at the
  perturbed point): one data pass is 2 effective epochs.

Evaluation and checkpoints happen at the first step boundary at or after each multiple of
``N`` closure calls (an outer step is never split), and once more at the end.  The LR
schedule (``MultiStepLR`` on ``schedule.milestones``) counts *outer* epochs of ``N`` steps,
as the paper's recipes do ("drops by a factor of 10 after the second epoch").

Train loss / error at an evaluation are the mean over the steps since the previous one
(each weighted by its number of targets) of the loss and error of the first closure call of
each step, which is always at x (for
Entropy-SGD the first SGLD iterate is x' = x): a running estimate in train mode (dropout
on), as Figs. 4-6 plot.  Validation (a held-out split of the training set) and test errors
are computed in eval mode after :func:`recompute_batchnorm`.

BatchNorm.  The inner SGLD iterates x' run forward passes in train mode, so the running
statistics describe x' rather than x.  Before every evaluation the harness resets them and
recomputes them at x from ``bn_batches`` (default 50) fixed training mini-batches with
cumulative averaging (``momentum=None``); this is done for every optimizer so all are
evaluated the same way.  50 x 128 = 6,400 samples pin a batch mean to ~1% of a standard
deviation, at the cost of 50 forward passes (< 5% of an epoch).

Checkpoints (``checkpoint.pt`` in the run directory, written to a temporary file and then
``os.replace``-d) hold the model, optimizer, scheduler, torch/numpy/python RNG states, the
stream position, counters and the log.  ``train(config, resume=True)`` continues from it;
a checkpoint written for a different config is refused with :class:`ConfigMismatchError`.
The run directory is ``<out>/<name>-<8 hex digits of the config hash>``.

Determinism: batch order of pass ``p`` is a permutation seeded by ``(seed, p)`` (no
hidden generator state); dropout and Langevin noise use the global torch RNG, which is
checkpointed.  Same machine and thread count give bit-identical resumed runs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from entropy_opt import SAM, SGLD, EntropyAdam, EntropySGD

from . import data as D
from .loop import (
    ImageStream,
    LoopCounters,
    RunningMetrics,
    TokenStream,
    batch_error,
    calls_per_step,
    cross_entropy,
    evaluate_metrics,
    forward,
    recompute_batchnorm,
    run_loop,
)
from .models import build

__all__ = [
    "OPTIMIZERS",
    "ConfigMismatchError",
    "RunConfig",
    "RunResult",
    "Task",
    "build_optimizer",
    "build_task",
    "calls_per_step",
    "evaluate",
    "recompute_batchnorm",
    "run_dir",
    "setup_run",
    "train",
]

OPTIMIZERS = ("sgd", "adam", "entropy-sgd", "entropy-adam", "sgld", "sam")
CHECKPOINT = "checkpoint.pt"


class ConfigMismatchError(RuntimeError):
    """A checkpoint exists in the run directory but was written for another config."""


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Everything that determines a run (and its hash); JSON-serialisable.

    Attributes:
        name: readable label, the first part of the run directory's name.
        model: a :data:`figures.models.REGISTRY` key; ``model_kwargs`` go to its builder.
        data: ``"mnist"``, ``"cifar10"``, ``"austen"``, ``"ptb"``, ``"synthetic-images"`` or
            ``"synthetic-tokens"``; ``data_kwargs`` configure it (see :func:`build_task`).
        optimizer: one of :data:`OPTIMIZERS`; ``optimizer_kwargs`` go to its constructor
            (for ``"sgd"`` the default is Nesterov momentum 0.9; for ``"sam"``, ``base``
            picks ``"sgd"`` or ``"adam"``).
        epochs: outer epochs (``N`` optimizer steps each); effective epochs are
            ``epochs x L``.
        milestones, lr_factor: the LR is multiplied by ``lr_factor`` at each outer epoch in
            ``milestones`` (``MultiStepLR``).
        batch_size: samples per mini-batch (rows of the batchified stream for text).
        seed: seeds the initialisation, the batch order, dropout and the noise.
        bn_batches: training mini-batches used by :func:`recompute_batchnorm`.
        clip_grad_norm: clip each closure's gradient to this norm (RNNs), None = off.
        eval_every: evaluate every this many effective epochs (default 1).
    """

    name: str
    model: str
    data: str
    optimizer: str
    epochs: int
    batch_size: int = 128
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    milestones: list[int] = field(default_factory=list)
    lr_factor: float = 1.0
    seed: int = 0
    bn_batches: int = 50
    clip_grad_norm: float | None = None
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        for label in ("epochs", "batch_size", "eval_every"):
            if int(getattr(self, label)) < 1:
                raise ValueError(f"{label} must be >= 1, got {getattr(self, label)}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """8 hex digits of the SHA-256 of the canonical JSON (keys sorted)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def run_dir(config: RunConfig, out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/<name>-<digest>``."""
    return Path(out_dir) / f"{config.name}-{config.digest()}"


# --------------------------------------------------------------------------------------
# Data: tasks (the mini-batch streams are in figures.loop)
# --------------------------------------------------------------------------------------


@dataclass
class Task:
    """A dataset with its loss and metrics.

    ``kind`` is ``"classification"`` (``splits`` hold ``(x, y)`` tensors; error is the
    fraction of wrong argmaxes) or ``"language"`` (``splits`` hold 1-D id streams; the
    metrics are the mean cross-entropy per token ``loss``, its exponential ``perplexity``
    and the fraction of mispredicted tokens ``error``).
    """

    kind: str
    splits: dict[str, Any]
    batch_size: int
    seed: int
    bptt: int = 50
    eval_batch_size: int = 1000
    info: dict[str, Any] = field(default_factory=dict)

    def stream(self) -> ImageStream | TokenStream:
        if self.kind == "classification":
            x, y = self.splits["train"]
            return ImageStream(x, y, self.batch_size, self.seed)
        return TokenStream(self.splits["train"], self.batch_size, self.bptt)

    def bn_batches(self, count: int) -> Iterator[Any]:
        """The first ``count`` training mini-batches in a fixed order (no stream state)."""
        if self.kind == "classification":
            x, _ = self.splits["train"]
            for i in range(min(count, math.ceil(len(x) / self.batch_size))):
                yield x[i * self.batch_size : (i + 1) * self.batch_size]
        else:
            stream = TokenStream(self.splits["train"], self.batch_size, self.bptt)
            for _ in range(min(count, stream.per_pass)):
                (x, _state), _ = stream.next()
                yield x


def _split_off(x: Tensor, y: Tensor, val: int, seed: int) -> tuple[tuple, tuple]:
    if not 0 < val < len(x):
        raise ValueError(f"val_size must be in (0, {len(x)}), got {val}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return (x[perm[val:]], y[perm[val:]]), (x[perm[:val]], y[perm[:val]])


def _synthetic_images(n: int, shape: list[int], classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Gaussian images labelled by a random linear teacher (learnable, no download)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    w = torch.randn(math.prod(shape), classes, generator=g)
    return x, (x.flatten(1) @ w).argmax(1)


def _synthetic_tokens(n: int, vocab: int, seed: int) -> Tensor:
    """A first-order Markov chain with 3 likely successors per token (learnable)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(vocab, (vocab, 3), generator=g)
    ids = torch.empty(n, dtype=torch.long)
    ids[0] = 0
    choice = torch.randint(3, (n,), generator=g)
    noise = torch.rand(n, generator=g) < 0.1
    rand = torch.randint(vocab, (n,), generator=g)
    for t in range(1, n):
        ids[t] = rand[t] if noise[t] else succ[ids[t - 1], choice[t]]
    return ids


def build_task(config: RunConfig) -> Task:
    """Load the data a config names and split it.

    ``data_kwargs`` by dataset:

    * ``mnist`` / ``cifar10``: ``val_size`` (default 5000) held out of the training set
      with a fixed seed; ``train_size`` / ``test_size`` subsample (default: all);
      ``root``.
    * ``austen``: the joined novels split 80/10/10 by characters (``fractions``);
      ``chars`` keeps the first that many characters of the text before splitting
      (default: all); ``bptt`` (default 50), ``eval_batch_size`` (default 10).  The
      vocabulary is every character of the (kept) text.
    * ``ptb``: the standard splits; ``bptt`` (default 35), ``tokens`` truncates each split.
    * ``synthetic-images``: ``n`` (default 512), ``shape`` (default [1, 28, 28]),
      ``classes`` (10), ``val_size``/``test_size`` (default n // 8 each).
    * ``synthetic-tokens``: ``n`` tokens (default 20,000), ``vocab`` (default 50), split
      80/10/10; ``bptt`` (default 20).
    """
    kw = dict(config.data_kwargs)
    seed, bs = config.seed, config.batch_size
    name = config.data
    if name in ("mnist", "cifar10", "synthetic-images"):
        if name == "synthetic-images":
            n = kw.get("n", 512)
            x, y = _synthetic_images(n, kw.get("shape", [1, 28, 28]), kw.get("classes", 10), 1234)
            nt = kw.get("test_size", n // 8)
            test = (x[:nt], y[:nt])
            x, y = x[nt:], y[nt:]
            val_size = kw.get("val_size", n // 8)
        else:
            load = D.load_mnist if name == "mnist" else D.load_cifar10
            x, y = load(kw.get("root"), split="train")
            test = load(kw.get("root"), split="test")
            if kw.get("test_size"):
                test = D.subsample(*test, kw["test_size"], seed=0)
            val_size = kw.get("val_size", 5000)
        train, val = _split_off(x, y, val_size, seed=0)
        if kw.get("train_size"):
            train = D.subsample(*train, kw["train_size"], seed=0)
        splits = {"train": train, "val": val, "test": test}
        return Task("classification", splits, bs, seed, eval_batch_size=kw.get("eval_batch_size", 1000))
    if name in ("austen", "ptb", "synthetic-tokens"):
        if name == "austen":
            text = D.load_austen(kw.get("root"))
            text = text[: kw["chars"]] if kw.get("chars") else text
            vocab = D.CharVocab.from_text(text)
            parts = D.char_splits(text, tuple(kw.get("fractions", (0.8, 0.1, 0.1))))
            splits = dict(zip(("train", "val", "test"), map(vocab.encode, parts), strict=True))
            info = {"vocab": len(vocab), "chars": len(text)}
            bptt = kw.get("bptt", 50)
        elif name == "ptb":
            corpus = D.load_ptb(kw.get("root"))
            tokens = kw.get("tokens")
            splits = {s: getattr(corpus, s)[:tokens] for s in ("train", "valid", "test")}
            splits["val"] = splits.pop("valid")
            info = {"vocab": len(corpus.vocab)}
            bptt = kw.get("bptt", 35)
        else:
            vocab_size = kw.get("vocab", 50)
            ids = _synthetic_tokens(kw.get("n", 20_000), vocab_size, 1234)
            a, b = int(0.8 * len(ids)), int(0.9 * len(ids))
            splits = {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}
            info = {"vocab": vocab_size}
            bptt = kw.get("bptt", 20)
        return Task("language", splits, bs, seed, bptt=bptt,
                    eval_batch_size=kw.get("eval_batch_size", 10), info=info)
    raise ValueError(f"unknown dataset {name!r}")


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: str, device: torch.device) -> dict[str, float]:
    """Eval-mode metrics on one split: ``loss`` and ``error`` (for language tasks also
    ``perplexity`` = exp(mean cross-entropy per token), the state carried across windows)."""
    if task.kind == "classification":
        return evaluate_metrics(model, task.splits[split], cross_entropy,
                                task.eval_batch_size, device)
    running = RunningMetrics()
    was = model.training
    model.eval()
    try:
        stream = TokenStream(task.splits[split], task.eval_batch_size, task.bptt)
        for _ in range(stream.per_pass):
            (x, state), y = stream.next()
            logits, new_state = forward(model, (x.to(device), state))
            stream.carry(new_state)
            y = y.to(device)
            running.add(cross_entropy(logits, y), batch_error(logits, y), y.numel())
    finally:
        model.train(was)
    return {"loss": running.loss, "error": running.error, "perplexity": math.exp(running.loss)}


# --------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------


def build_optimizer(name: str, params: Any, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) on ``params``.

    ``"sgd"`` defaults to Nesterov momentum 0.9 (the paper's baseline); ``"sam"`` wraps
    ``torch.optim.SGD`` (Nesterov 0.9 by default) or, with ``base="adam"``, Adam.
    """
    kw = dict(kwargs)
    if name == "sgd":
        kw.setdefault("momentum", 0.9)
        kw.setdefault("nesterov", kw["momentum"] > 0)
        return torch.optim.SGD(params, **kw)
    if name == "adam":
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return torch.optim.Adam(params, **kw)
    if name == "entropy-sgd":
        return EntropySGD(params, **kw)
    if name == "entropy-adam":
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return EntropyAdam(params, **kw)
    if name == "sgld":
        return SGLD(params, **kw)
    if name == "sam":
        base = kw.pop("base", "sgd")
        if base == "sgd":
            kw.setdefault("momentum", 0.9)
            kw.setdefault("nesterov", kw["momentum"] > 0)
            return SAM(params, torch.optim.SGD, **kw)
        return SAM(params, torch.optim.Adam, **kw)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


# --------------------------------------------------------------------------------------
# Runs: config -> checkpointed figures.loop.run_loop
# --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What :func:`train` returns: the trained model (eval mode), the log rows, the run
    directory and the task (for further evaluation, e.g. spectra)."""

    model: nn.Module
    log: list[dict[str, Any]]
    directory: Path
    task: Task
    config: RunConfig

    @property
    def final(self) -> dict[str, Any]:
        return self.log[-1]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_logs(directory: Path, log: list[dict[str, Any]], config: RunConfig) -> None:
    tmp = directory / "log.json.tmp"
    tmp.write_text(json.dumps({"config": config.to_dict(), "log": log}, indent=1))
    os.replace(tmp, directory / "log.json")
    if log:
        keys = list(dict.fromkeys(k for row in log for k in row))
        tmp = directory / "log.csv.tmp"
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(log)
        os.replace(tmp, directory / "log.csv")


def setup_run(config: RunConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, Task]:
    """The task and the freshly initialised model (seeded by ``config.seed``) of a run;
    every optimizer with the same seed and model starts from these weights."""
    device = torch.device(device)
    task = build_task(config)
    torch.manual_seed(config.seed)
    model_kwargs = dict(config.model_kwargs)
    if task.kind == "language" and "vocab" in task.info:
        model_kwargs.setdefault("vocab", task.info["vocab"])
    model = build(config.model, **model_kwargs).to(device)
    return model, task


def train(
    config: RunConfig,
    out_dir: str | os.PathLike = "figures/out/runs",
    *,
    device: str | torch.device = "cpu",
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    max_effective_epochs: float | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train per ``config``; log, evaluate and checkpoint at every effective epoch.

    Args:
        config: the run.
        out_dir: parent of the run directory (:func:`run_dir`).
        device: ``"cpu"`` (default) or ``"cuda"``; not part of the config.
        resume: continue from the run directory's checkpoint if there is one (default);
            False starts over (and overwrites it).
        progress: tqdm bar over optimizer steps.
        stop_after: stop (as if killed) after this many evaluations of this call; for
            tests and time-boxed runs.  The checkpoint lets a later call go on.
        max_effective_epochs: stop (resumably, as ``stop_after``) at the first evaluation at
            or past this many effective epochs; e.g. the first 25 of a 50-epoch baseline to
            compare it with a 25-effective-epoch Entropy-Adam run at equal cost.
        on_eval: called with each new log row.

    The initial weights come from ``config.seed`` alone (:func:`setup_run`), so runs that
    differ only in the optimizer start from the same point.
    Returns a :class:`RunResult`; the model is left at the final weights in eval mode.
    """
    if max_effective_epochs is not None and not max_effective_epochs > 0:
        raise ValueError(f"max_effective_epochs must be > 0, got {max_effective_epochs}")
    device = torch.device(device)
    directory = run_dir(config, out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
    model, task = setup_run(config, device)
    opt = build_optimizer(config.optimizer, model.parameters(), config.optimizer_kwargs)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(config.milestones), config.lr_factor)
    stream = task.stream()
    counters = LoopCounters()
    log: list[dict[str, Any]] = []
    elapsed = 0.0
    torch.manual_seed(config.seed + 1)  # dropout / noise stream, independent of the init

    ckpt_path = directory / CHECKPOINT
    if resume and ckpt_path.exists():
        # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["digest"] != config.digest():
            raise ConfigMismatchError(
                f"{ckpt_path} was written for config {ckpt['digest']} "
                f"({ckpt['config']}), not {config.digest()}; pass resume=False to start over")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        stream.load_state_dict(ckpt["stream"])
        counters = LoopCounters(ckpt["steps"], ckpt["calls"])
        elapsed, log = ckpt["elapsed"], ckpt["log"]
        _set_rng_state(ckpt["rng"])

    evals_this_call = 0
    t0 = time.perf_counter()

    def reached_cap(counters: LoopCounters) -> bool:
        return (max_effective_epochs is not None
                and counters.calls / stream.per_pass >= max_effective_epochs - 1e-9)

    if reached_cap(counters):
        model.eval()
        return RunResult(model, log, directory, task, config)

    def on_boundary(counters: LoopCounters, running: RunningMetrics) -> bool:
        nonlocal elapsed, t0, evals_this_call
        elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        row = _evaluate_row(model, task, config, device, running, counters, stream.per_pass, opt)
        row["seconds"] = elapsed
        elapsed += time.perf_counter() - t0  # evaluation time counts too
        log.append(row)
        _atomic_save({
            "digest": config.digest(), "config": config.to_dict(),
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "stream": stream.state_dict(),
            "steps": counters.steps, "calls": counters.calls, "elapsed": elapsed, "log": log,
            "rng": _rng_state(),
        }, ckpt_path)
        _write_logs(directory, log, config)
        t0 = time.perf_counter()
        if on_eval is not None:
            on_eval(row)
        evals_this_call += 1
        return (stop_after is not None and evals_this_call >= stop_after) or reached_cap(counters)

    run_loop(model, opt, stream, total_steps=config.epochs * stream.per_pass,
             on_boundary=on_boundary, every=config.eval_every, unit="calls",
             scheduler=sched, clip_grad_norm=config.clip_grad_norm, counters=counters,
             device=device, progress=progress, desc=directory.name)
    return RunResult(model, log, directory, task, config)


def _evaluate_row(
    model: nn.Module, task: Task, config: RunConfig, device: torch.device,
    running: RunningMetrics, counters: LoopCounters, per_pass: int,
    opt: torch.optim.Optimizer,
) -> dict[str, Any]:
    """One log row: counters, the running train metrics, BN recompute, val/test metrics."""
    recompute_batchnorm(model, (b.to(device) for b in task.bn_batches(config.bn_batches)),
                        config.bn_batches)
    row: dict[str, Any] = {
        "effective_epoch": counters.calls / per_pass,
        "epoch": counters.steps / per_pass,
        "steps": counters.steps,
        "grad_evals": counters.calls,
        "L": calls_per_step(opt),
        "lr": opt.param_groups[0]["lr"],
        "train_loss": running.loss,
        "train_error": running.error,
    }
    if "gamma" in opt.param_groups[0]:
        # the scoped gamma of the last step; the group holds only the initial gamma0
        diagnostics = opt.state.get("diagnostics") or {}
        row["gamma"] = float(diagnostics.get("gamma", opt.param_groups[0]["gamma"]))
    for split in ("val", "test"):
        for key, value in evaluate(model, task, split, device).items():
            row[f"{split}_{key}"] = value
    if task.kind == "language":
        row["train_perplexity"] = math.exp(row["train_loss"])
    return row
