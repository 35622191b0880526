"""A figure's training runs: its preset turned into the one :class:`~figures.harness.RunConfig`,
trained by :func:`figures.harness.train` or read back from the cache.

:func:`run_config` maps a figure preset (:mod:`figures.presets`: model, data, optimizer
and schedule) onto a run configuration: the learning rate times ``decay`` every
``decay_every`` epochs becomes ``milestones``; the batches keep a pass's last short batch;
BatchNorm is left as training made it; the log rows hold the running training loss only;
the training RNG is seeded with the run's seed.
:func:`trained_run` trains one run (or reads it from the :class:`~figures.cache.Cache`,
keyed by that configuration, the data's identity and the source of the code that trains),
then hands the trained run to the figure's ``finish`` hook (what the figure computes from
the optimizer and the weights).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import harness, loop, models, optimizers, presets, tasks
from .cache import Cache, code_version, config_key
from .datasets import chars, synthetic
from .harness import RunConfig, RunResult, train
from .tasks import Task, build_task, evaluate

__all__ = [
    "FigureRun",
    "run_config",
    "figure_task",
    "trained_run",
    "hessian_batches",
    "tensor_digest",
    "task_identity",
    "grad_norm",
    "train_metrics",
    "stats_head",
    "stats_tail",
    "plan_head",
    "figure_setup",
]

#: What a figure computes from a trained run: ``(record entries, named arrays)``.
Finish = Callable[[RunResult], tuple[dict[str, Any], dict[str, np.ndarray]]]


def _data(cfg: presets.DataConfig, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The task builder's ``data`` and ``data_kwargs`` for a figure's :class:`DataConfig`."""
    common = {"data_seed": cfg.seed, "drop_last": False, **extra}
    if cfg.source in ("austen", "synthetic-text"):
        name = "austen-lines" if cfg.source == "austen" else "synthetic-lines"
        return name, {
            "lines": cfg.n_train,
            "test_lines": cfg.n_test,
            "line_len": cfg.line_len,
            "vocab_size": cfg.vocab_size,
            **common,
        }
    images = {"val_size": 0, "test_head": cfg.n_test, **common}
    if cfg.source == "synthetic-images":
        return "synthetic-prototypes", {"n": cfg.n_train, **images}
    if cfg.source not in ("mnist", "cifar10"):
        raise ValueError(
            f"unknown data source {cfg.source!r}; choose from mnist, cifar10, "
            "austen, synthetic-images, synthetic-text"
        )
    return cfg.source, {**({"train_size": cfg.n_train} if cfg.n_train else {}), **images}


def run_config(figure: str, cfg: Any, seed: int, **data_kwargs: Any) -> RunConfig:
    """The :class:`RunConfig` of run ``seed`` of a figure preset ``cfg`` (any preset with
    ``model``, ``model_kwargs``, ``data`` and ``optim``); ``data_kwargs`` add task-builder
    options (e.g. ``channels=3``)."""
    o: presets.OptimConfig = cfg.optim
    kwargs: dict[str, Any] = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.name in ("sgd", "sam", "entropy-sgd"):
        kwargs.update(momentum=o.momentum, nesterov=o.nesterov)
    data, kw = _data(cfg.data, data_kwargs)
    return RunConfig(
        name=figure,
        model=cfg.model,
        model_kwargs=dict(cfg.model_kwargs),
        data=data,
        data_kwargs=kw,
        optimizer=o.name,
        optimizer_kwargs=kwargs,
        epochs=o.epochs,
        batch_size=o.batch_size,
        milestones=list(range(o.decay_every, o.epochs + 1, o.decay_every)) if o.decay_every else [],
        lr_factor=o.decay if o.decay_every else 1.0,
        seed=seed,
        bn_batches=0,
        eval_splits=[],
        noise_seed=seed,
    )


def figure_task(figure: str, cfg: Any, **data_kwargs: Any) -> Task:
    """The data of a figure (the same for all its runs)."""
    return build_task(run_config(figure, cfg, cfg.seed, **data_kwargs))


def hessian_batches(task: Task, n: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` training samples in batches of ``batch_size`` (the last one short)."""
    x, y = task.splits["train"]
    n = min(n, len(x))
    return [
        (x[i : min(i + batch_size, n)], y[i : min(i + batch_size, n)])
        for i in range(0, n, batch_size)
    ]


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 (hex) of the tensors' shapes, dtypes and bytes: a data set's identity."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def task_identity(task: Task) -> str:
    """:func:`tensor_digest` of the training and test tensors of a task."""
    return tensor_digest(*task.splits["train"], *task.splits["test"])


def grad_norm(
    model: nn.Module, loss_fn: Callable, batches: list[tuple[Tensor, Tensor]], device: str
) -> float:
    """||grad L|| of the loss the Hessian is taken of (sample-weighted over batches), in
    eval mode; the model's gradients are cleared afterwards."""
    model.eval()
    model.zero_grad(set_to_none=True)
    n = sum(len(y) for _, y in batches)
    for x, y in batches:
        (loss_fn(model(x.to(device)), y.to(device)) * (len(y) / n)).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return float(g.norm())


def train_metrics(result: RunResult) -> dict[str, Any]:
    """A figure run's training record: per-epoch running loss, steps, seconds and the
    eval-mode training loss/error and test error at the final weights."""
    device = next(result.model.parameters()).device
    train_split = evaluate(result.model, result.task, "train", device)
    return {
        "epoch_losses": [row["train_loss"] for row in result.log],
        "steps": result.final["steps"],
        "seconds": result.final["seconds"],
        "train_loss": train_split["loss"],
        "train_error": train_split["error"],
        "test_error": evaluate(result.model, result.task, "test", device)["error"],
    }


@dataclass
class FigureRun:
    """One trained run of a figure: the model (eval mode, on the device), its record
    (:func:`train_metrics` plus the figure's entries), the figure's arrays, whether it
    came from the cache, and the configuration that keys it."""

    model: nn.Module
    record: dict[str, Any]
    arrays: dict[str, np.ndarray]
    cached: bool
    key: dict[str, Any]


#: A figure run's checkpoint interval: a few minutes of training lost at most (the paper
#: preset's hour-long runs), not a write after each of Fig 3b's 300 short epochs.
_CHECKPOINT_SECONDS = 120.0
#: The code that trains a figure's runs: editing any of it retrains (and nothing else does).
_TRAINING_CODE = [loop, models, harness, tasks, optimizers, synthetic, chars]


def trained_run(
    figure: str,
    preset: str,
    config: RunConfig,
    task: Task,
    device: str,
    cache: Cache,
    finish: Finish | None = None,
    key_extra: dict | None = None,
    progress: bool = True,
) -> FigureRun:
    """Train ``config`` through :func:`figures.harness.train` (resumable, in a folder of
    the cache) and apply ``finish``, or read both from the cache.

    ``task`` is the figure's data (its identity keys the entry); ``key_extra`` holds
    whatever else ``finish`` depends on.  Without ``finish`` the record is
    :func:`train_metrics` alone.
    """
    key = {
        "kind": "figure-run",
        "figure": figure,
        "preset": preset,
        "run": config.to_dict(),
        "data_identity": task_identity(task),
        **(key_extra or {}),
        "code": code_version(
            [*_TRAINING_CODE, run_config, trained_run, train_metrics, *([finish] if finish else [])]
        ),
        "torch": torch.__version__,
    }

    def compute() -> tuple[dict[str, Tensor], dict[str, Any], dict[str, np.ndarray]]:
        def at_end(result: RunResult) -> dict[str, Any]:
            record, arrays = finish(result) if finish else ({}, {})
            return {"record": {**train_metrics(result), **record}, "arrays": arrays}

        scratch = None if cache.enabled else tempfile.TemporaryDirectory()
        runs = Path(scratch.name) if scratch else cache.root / "runs" / config_key(key)[:16]
        try:
            result = train(
                config,
                runs,
                device=device,
                progress=progress,
                at_end=at_end,
                checkpoint_seconds=_CHECKPOINT_SECONDS,
            )
        finally:
            if scratch:
                scratch.cleanup()
        state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
        return state, result.extras["record"], result.extras["arrays"]

    def save(value: tuple, folder: Path) -> None:
        torch.save(value[0], folder / "model.pt")
        (folder / "train.json").write_text(json.dumps(value[1], indent=1))
        np.savez(folder / "arrays.npz", **value[2])

    def read(folder: Path) -> tuple:
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        with np.load(folder / "arrays.npz") as arrays:
            return state, json.loads((folder / "train.json").read_text()), dict(arrays)

    (state, record, arrays), hit = cache.get_or_compute(key, compute, save, read)
    if cache.enabled:  # the entry holds the weights now; the resumable copy is spent
        shutil.rmtree(cache.root / "runs" / config_key(key)[:16], ignore_errors=True)
    torch.manual_seed(config.seed)
    model = models.build(config.model, **config.model_kwargs)
    model.load_state_dict(state)
    model.to(device).eval()
    return FigureRun(model, record, arrays, hit, key)


def stats_head(figure: str, preset: str, task: Task, cfg: Any) -> dict[str, Any]:
    """The first entries of every trained figure's JSON: which figure, preset, data,
    model and optimizer."""
    return {
        "figure": figure,
        "preset": preset,
        "dataset": task.info["dataset"],
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "optimizer": cfg.optim.name,
    }


def stats_tail(task: Task, cfg: Any) -> dict[str, Any]:
    """The last entries of every trained figure's JSON: the paper's numbers, the note,
    the whole preset entry and the data's identity."""
    return {
        "paper": cfg.paper,
        "note": cfg.note,
        "config": presets.as_dict(cfg),
        "data_identity": task_identity(task),
    }


def plan_head(figure: str, preset: str, cfg: Any) -> dict[str, Any]:
    """The first entries of every trained figure's ``--dry-run`` plan, with the
    parameter count (the model is built, nothing else)."""
    n = models.count_parameters(models.build(cfg.model, **cfg.model_kwargs))
    return {
        "figure": figure,
        "preset": preset,
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "n_params": n,
        "n_train": cfg.data.n_train or "all",
    }


def figure_setup(
    figure: str,
    preset: str,
    out_dir: str | Path,
    use_cache: bool,
    data_options: Callable[[Any], dict[str, Any]] | None = None,
) -> tuple[Any, Cache, Task]:
    """A trained figure's preset entry, its cache (``<out_dir>/cache``; ``use_cache``
    False computes everything) and its data (:func:`figure_task`, with the task-builder
    options ``data_options(entry)``)."""
    cfg = presets.get(preset, figure)
    cache = Cache(Path(out_dir) / "cache", enabled=use_cache)
    return cfg, cache, figure_task(figure, cfg, **(data_options(cfg) if data_options else {}))
