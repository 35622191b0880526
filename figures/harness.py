"""The training harness: configs, evaluation, logs and checkpoints around the one loop
(:func:`figures.loop.run_loop`), for every model and optimizer of the paper.

``train(config)`` trains the model a :class:`RunConfig` names with SGD (Nesterov), Adam,
Entropy-SGD, Entropy-Adam, SGLD or SAM, evaluates at every *effective epoch*, logs to
JSON and CSV, and checkpoints so that an interrupted run resumes bit-identically.  Every
run of the project goes through it: Table 1, the comparison, the search and every
figure's runs (:mod:`figures.figure_runs`; ``at_end`` is the hook for what a figure does
with the trained run).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .loop import LoopCounters, RunningMetrics, calls_per_step, recompute_batchnorm, run_loop
from .models import build
from .optimizers import OPTIMIZERS, build_optimizer
from .tasks import Task, build_task, evaluate

__all__ = [
    "ConfigMismatchError",
    "RunConfig",
    "RunResult",
    "run_dir",
    "setup_run",
    "train",
]

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
        data: a :data:`figures.tasks.DATASETS` key (``"mnist"``, ``"cifar10"``, ``"austen"``,
            ``"ptb"``, the figures' ``"austen-lines"``, the synthetic ones for tests);
            ``data_kwargs`` configure it (see :func:`figures.tasks.build_task`).
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
        eval_splits: the held-out splits each log row evaluates; None (default) = every
            one the task has (``val``, ``test``).  The figures log only the running train
            metrics per epoch and evaluate at the end.
        noise_seed: seed of the global torch RNG while training (dropout, Langevin noise);
            None (default) = ``seed + 1``, independent of the initialisation.  The figures
            use ``seed``, as their runs always have.

    Fields added after runs were recorded (:data:`ADDED_FIELDS`) are left out of
    :meth:`to_dict` and :meth:`digest` while they hold their default, so every existing
    run directory keeps its name and resumes.
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
    eval_splits: list[str] | None = None
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        for label in ("epochs", "batch_size", "eval_every"):
            if int(getattr(self, label)) < 1:
                raise ValueError(f"{label} must be >= 1, got {getattr(self, label)}")
        if self.bn_batches < 0:
            raise ValueError(
                f"bn_batches must be >= 0 (0: leave BatchNorm alone), got {self.bn_batches}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (what :meth:`digest` hashes and the logs record)."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        for name, default in ADDED_FIELDS.items():
            if data[name] == default:
                del data[name]
        return data

    def digest(self) -> str:
        """8 hex digits of the SHA-256 of the canonical JSON (keys sorted)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (checked like a new config)."""
        return dataclasses.replace(self, **changes)


#: Fields added to :class:`RunConfig` after runs were recorded, with their defaults.
ADDED_FIELDS: dict[str, Any] = {"eval_splits": None, "noise_seed": None}


def run_dir(config: RunConfig, out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/<name>-<digest>``."""
    return Path(out_dir) / f"{config.name}-{config.digest()}"


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
    optimizer: torch.optim.Optimizer | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        """The last log row."""
        return self.log[-1]


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
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
    checkpoint_seconds: float = 0.0,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    at_end: Callable[[RunResult], dict[str, Any]] | None = None,
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
        checkpoint_seconds: write the checkpoint and logs at an evaluation only when this
            many seconds have passed since the last write (default 0: at every one); the
            last evaluation and a stop always write.  Where the checkpoints fall does not
            change the run (a resumed run is bit-identical); figures with hundreds of
            short epochs use it to skip the writes.
        at_end: what the caller does with the trained run (e.g. a figure reading Adam's
            moments or evaluating the training split), called with the finished
            :class:`RunResult`; its dict becomes ``RunResult.extras``.  Also called when
            the run was already complete and is only loaded from its checkpoint, not
            when the run stops early (``stop_after``, ``max_effective_epochs``).

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
    # dropout / noise stream, by default independent of the init
    torch.manual_seed(config.seed + 1 if config.noise_seed is None else config.noise_seed)

    ckpt_path = directory / CHECKPOINT
    if resume and ckpt_path.exists():
        # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["digest"] != config.digest():
            raise ConfigMismatchError(
                f"{ckpt_path} was written for config {ckpt['digest']} "
                f"({ckpt['config']}), not {config.digest()}; pass resume=False to start over"
            )
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
        return (
            max_effective_epochs is not None
            and counters.calls / stream.per_pass >= max_effective_epochs - 1e-9
        )

    if reached_cap(counters):
        model.eval()
        return RunResult(model, log, directory, task, config, opt)

    total_steps = config.epochs * stream.per_pass
    saved_at = -math.inf

    def on_boundary(counters: LoopCounters, running: RunningMetrics) -> bool:
        nonlocal elapsed, t0, evals_this_call, saved_at
        elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        row = _evaluate_row(model, task, config, device, running, counters, stream.per_pass, opt)
        row["seconds"] = elapsed
        elapsed += time.perf_counter() - t0  # evaluation time counts too
        log.append(row)
        evals_this_call += 1
        stop = (stop_after is not None and evals_this_call >= stop_after) or reached_cap(counters)
        if (
            stop
            or counters.steps == total_steps
            or time.perf_counter() - saved_at >= checkpoint_seconds
        ):
            _atomic_save(
                {
                    "digest": config.digest(),
                    "config": config.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "stream": stream.state_dict(),
                    "steps": counters.steps,
                    "calls": counters.calls,
                    "elapsed": elapsed,
                    "log": log,
                    "rng": _rng_state(),
                },
                ckpt_path,
            )
            _write_logs(directory, log, config)
            saved_at = time.perf_counter()
        t0 = time.perf_counter()
        if on_eval is not None:
            on_eval(row)
        return stop

    run_loop(
        model,
        opt,
        stream,
        total_steps=total_steps,
        on_boundary=on_boundary,
        every=config.eval_every,
        unit="calls",
        scheduler=sched,
        clip_grad_norm=config.clip_grad_norm,
        counters=counters,
        device=device,
        progress=progress,
        desc=directory.name,
    )
    result = RunResult(model, log, directory, task, config, opt)
    if at_end is not None and counters.steps == total_steps:
        result.extras = at_end(result)
    return result


def _evaluate_row(
    model: nn.Module,
    task: Task,
    config: RunConfig,
    device: torch.device,
    running: RunningMetrics,
    counters: LoopCounters,
    per_pass: int,
    opt: torch.optim.Optimizer,
) -> dict[str, Any]:
    """One log row: counters, the running train metrics, BN recompute (unless
    ``bn_batches`` is 0), the metrics of the held-out splits the task has."""
    if config.bn_batches:
        recompute_batchnorm(
            model, (b.to(device) for b in task.bn_batches(config.bn_batches)), config.bn_batches
        )
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
        diagnostics = getattr(opt, "diagnostics", None)
        if not isinstance(diagnostics, dict):  # older optimizers: a flag, the record in state
            diagnostics = opt.state.get("diagnostics") or {}
        row["gamma"] = float(diagnostics.get("gamma", opt.param_groups[0]["gamma"]))
    splits = [s for s in ("val", "test") if s in task.splits]
    for split in splits if config.eval_splits is None else config.eval_splits:
        for key, value in evaluate(model, task, split, device).items():
            row[f"{split}_{key}"] = value
    if task.kind == "language":
        row["train_perplexity"] = math.exp(row["train_loss"])
    return row
