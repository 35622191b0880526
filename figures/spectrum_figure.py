"""The Hessian-spectrum figures (Fig 1, 3a, 3b): one pipeline, a title each.

data -> train-or-load each run (:func:`figures.figure_runs.trained_run`, through
:func:`figures.harness.train`) -> exact spectrum-or-load (cached) -> statistics -> plot ->
``<name>.json/.png/.pdf``.  Cache keys hold the full configuration: preset, figure, the
run configuration, the data's identity (a hash of the tensors actually used) and a code
version (a hash of the source that computes the result).

Paper: Fig 1, small-LeNet with Adam on MNIST, 2 runs, 94% of |lambda| below 1e-4, largest
~40, most negative -0.46, test error 2.4%; Fig 3a, small-mnistfc with momentum SGD, 2 runs,
90% at most 1e-2, test error 2.5%; Fig 3b, a char-LSTM with Adam on 256 lines x 32
characters of War and Peace (here: Jane Austen's novels), 5 runs, almost 95% below 1e-5.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import spectra
from spectra.dense_eigensolver import eigensolver_workspace_bytes
from spectra.exact import available_memory_bytes

from . import models, presets, report
from .cache import Cache, code_version, config_key
from .figure_runs import (
    FigureRun,
    figure_setup,
    grad_norm,
    hessian_batches,
    plan_head,
    run_config,
    stats_head,
    stats_tail,
    task_identity,
    trained_run,
)
from .loop import cross_entropy
from .request import FigureRequest
from .run_store import RunStore
from .stats import MEAN_KEYS, sample_rank_bound, spectrum_stats

__all__ = [
    "TITLES",
    "run",
    "plan",
    "spectrum_or_load",
    "default_caption",
    "loss_for",
    "selected_runs",
]

#: The spectrum figures and their plot titles.
TITLES = {
    "fig1": "Fig 1: small-LeNet on MNIST (Adam)",
    "fig3a": "Fig 3a: small-mnistfc on MNIST (momentum SGD)",
    "fig3b": "Fig 3b: char-LSTM on 256 lines x 32 characters (Adam)",
}
#: The library code whose source versions a cached spectrum.
_SPECTRUM_CODE = [
    importlib.import_module(f"spectra.{name}")
    for name in (
        "exact",
        "hessian",
        "curvature",
        "batches",
        "parameters",
        "dense_eigensolver",
        "_lapack",
        "spectrum",
    )
]

_FORWARDS: dict[str, Callable[[nn.Module, Any], Any] | None] = {
    "model": None,
    "unrolled-lstm": models.unrolled_lstm_forward,
}


def loss_for(cfg: presets.SpectrumFigure) -> Callable:
    """The loss the Hessian is taken of: ``nn.CrossEntropyLoss`` per image, the mean
    cross-entropy per character for text."""
    text = cfg.data.source in ("austen", "synthetic-text")
    return cross_entropy if text else nn.CrossEntropyLoss()


def forward_for(cfg: presets.SpectrumFigure) -> Callable[[nn.Module, Any], Any] | None:
    """The forward the Hessian of ``cfg`` is built with (None: ``model(inputs)``); see
    ``SpectrumFigure.hessian_forward``."""
    return _FORWARDS[cfg.hessian_forward]


def spectrum_or_load(
    model: nn.Module,
    cfg: presets.SpectrumFigure,
    batches: list,
    weights_config: dict,
    cache: Cache,
    name: str,
    progress: bool = True,
) -> tuple[spectra.Spectrum, bool]:
    """The exact Hessian spectrum of ``model`` over ``batches`` (from the cache if
    present); returns ``(spectrum, hit)``."""
    config = {
        "kind": "spectrum",
        "weights": weights_config,
        "n_hessian": cfg.data.n_hessian,
        "hessian_batch": cfg.data.hessian_batch,
        "dtype": cfg.dtype,
        "chunk": cfg.hessian_chunk,
        "forward": cfg.hessian_forward,
        "name": name,
        "code": _spectrum_code_version(),
    }
    if cfg.hessian_backend != "auto":  # keeps the keys of the builds made before the field
        config["backend"] = cfg.hessian_backend

    checkpoint = None
    on_host = next(model.parameters()).device.type == "cpu"
    # The row checkpoint is a file on the host (CPU builds only); a GPU build takes
    # minutes, and the spectrum itself is still cached.
    if cache.enabled and cfg.checkpoint and on_host:
        # Keyed by the problem, not the code: a build that outlives a session must
        # survive edits to spectra/, and the library itself re-checks a checkpoint's rows
        # (or a finished one's matrix) against the current code before using them.
        problem = {key: value for key, value in config.items() if key != "code"}
        checkpoint = cache.root / "checkpoints" / config_key(problem)

    def compute() -> spectra.Spectrum:
        return spectra.exact_spectrum(
            model,
            loss_for(cfg),
            batches,
            dtype=getattr(torch, cfg.dtype),
            name=name,
            progress=progress,
            chunk_size=cfg.hessian_chunk,
            forward=_FORWARDS[cfg.hessian_forward],
            checkpoint=checkpoint,
            backend=cfg.hessian_backend,
        )

    return cache.get_or_compute(
        config,
        compute,
        save=lambda s, folder: s.save(folder / "spectrum.npz"),
        read=lambda folder: spectra.Spectrum.load(folder / "spectrum.npz"),
    )


def run(figure: str, request: FigureRequest = FigureRequest()) -> dict[str, Any]:
    """Train the runs, take their exact spectra, write ``<figure>.png/.pdf/.json``.

    Args:
        figure: one of :data:`TITLES`.
        request: preset, output folder, device, cache and progress
            (:class:`figures.request.FigureRequest`).

    Returns the statistics written to ``<figure>.json``.
    """
    preset, out_dir, device, use_cache, progress = request.astuple()
    t0 = time.perf_counter()
    selected = selected_runs(
        request.only_runs, presets.get(preset, figure).runs, use_cache or bool(request.runs_dir)
    )
    cfg, cache, task = figure_setup(figure, preset, out_dir, use_cache)
    batches = hessian_batches(task, cfg.data.n_hessian, cfg.data.hessian_batch)
    loss_fn = loss_for(cfg)
    store = RunStore(request.runs_dir, figure) if request.runs_dir else None
    runs, spectra_list = [], []
    for i in selected:
        seed = cfg.seed + i
        config = run_config(figure, cfg, seed)
        problem = run_problem(figure, preset, cfg, config, task)
        stored = store.read(i + 1, problem) if store else None
        if stored is not None:
            record, s = stored
        else:
            trained: FigureRun = trained_run(
                figure, preset, config, task, device, cache, progress=progress
            )
            s, hit = spectrum_or_load(
                trained.model, cfg, batches, trained.key, cache, f"run {i + 1}", progress
            )
            record = {
                "seed": seed,
                **trained.record,
                "weights_cached": trained.cached,
                "spectrum_cached": hit,
                "grad_norm": grad_norm(trained.model, loss_fn, batches, device),
            }
            if store:
                store.write(i + 1, problem, record, s, _provenance(device, trained.key))
        spectra_list.append(s)
        runs.append({**record, **spectrum_stats(s, cfg.near_zero_tol)})
    if len(selected) < cfg.runs:  # a share of the runs: they are in the cache, no figure
        return {
            "figure": figure,
            "preset": preset,
            "partial": True,
            "runs_total": cfg.runs,
            "runs": runs,
            "seconds": time.perf_counter() - t0,
        }
    mean_keys = MEAN_KEYS
    stats: dict[str, Any] = {
        **stats_head(figure, preset, task, cfg),
        "n_params": runs[0]["n_params"],
        "n_samples": runs[0]["n_samples"],
        "n_train": len(task.splits["train"][0]),
        "n_test": len(task.splits["test"][0]),
        "dtype": cfg.dtype,
        "near_zero_tol": cfg.near_zero_tol,
        "sample_rank_bound": sample_rank_bound(
            runs[0]["n_params"], *_terms_and_classes(_architecture(cfg), cfg, batches)
        ),
        "n_runs": cfg.runs,
        "mean": {k: float(np.mean([r[k] for r in runs])) for k in mean_keys},
        "runs": runs,
        **stats_tail(task, cfg),
    }
    stats["caption"] = default_caption(stats)
    fig = spectra.plot.spectrum(spectra_list, near_zero_tol=cfg.near_zero_tol, center=cfg.center)
    central = fig.axes[0]
    if central.get_legend() is not None:  # keep it clear of the "peak clipped" note at the top
        central.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.88))
    return report.publish(out_dir, figure, fig, stats, TITLES[figure], t0)


def run_problem(figure: str, preset: str, cfg: Any, config: Any, task: Any) -> dict[str, Any]:
    """What a run's spectrum is a function of, machine aside: the figure, preset, run
    configuration, the data's digest and the Hessian's samples, dtype, forward and
    backend (what :class:`figures.run_store.RunStore` compares before reusing a run)."""
    return {
        "figure": figure,
        "preset": preset,
        "run": config.to_dict(),
        "data_identity": task_identity(task),
        "n_hessian": cfg.data.n_hessian,
        "hessian_batch": cfg.data.hessian_batch,
        "dtype": cfg.dtype,
        "forward": cfg.hessian_forward,
        "backend": cfg.hessian_backend,
    }


def _provenance(device: str, weights_key: dict[str, Any]) -> dict[str, Any]:
    """Where a run was computed: device (and GPU name), torch, the training and
    spectrum code versions."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "training_code": weights_key.get("code"),
        "spectrum_code": _spectrum_code_version(),
    }


def _spectrum_code_version() -> str:
    """The hash of the source that computes a figure's spectrum (keys its cache entry)."""
    return code_version([*_SPECTRUM_CODE, models.unrolled_lstm_forward, spectrum_or_load])


def _architecture(cfg: Any) -> nn.Module:
    """An untrained network of ``cfg``'s architecture (for shapes only)."""
    return models.build(cfg.model, **cfg.model_kwargs)


def selected_runs(only_runs: tuple[int, ...], n_runs: int, use_cache: bool) -> list[int]:
    """The 0-based indices of the runs to compute: ``only_runs`` (numbered from 1, see
    :class:`figures.request.FigureRequest`) checked against the ``n_runs`` the preset has,
    or every run when it is empty.  Raises ``ValueError`` before any work for a number
    outside 1..n_runs, a repeated one, or a share of the runs without the cache (where
    they would be computed and then lost)."""
    if not only_runs:
        return list(range(n_runs))
    bad = [r for r in only_runs if not 1 <= r <= n_runs]
    if bad:
        raise ValueError(f"--only-runs {' '.join(map(str, bad))}: this preset has runs 1..{n_runs}")
    if len(set(only_runs)) != len(only_runs):
        raise ValueError(f"--only-runs {' '.join(map(str, only_runs))} names a run twice")
    if not use_cache:
        raise ValueError(
            "--only-runs keeps its runs in the cache (or in --runs-dir) for a later call to "
            "make the figure from; drop --no-cache or pass --runs-dir"
        )
    return [r - 1 for r in only_runs]


def _terms_and_classes(model: nn.Module, cfg: Any, batches: list) -> tuple[int, int]:
    """Targets the Hessian's loss averages over, and the classes of each (the logits'
    dimension 1, as cross-entropy reads them)."""
    forward = _FORWARDS[cfg.hessian_forward] or (lambda m, x: m(x))
    x, _ = batches[0]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            classes = int(forward(model, x[:1].to(next(model.parameters()).device)).shape[1])
    finally:
        model.train(was)
    return sum(int(y.numel()) for _, y in batches), classes


def default_caption(stats: dict[str, Any]) -> str:
    """Caption naming the preset, data, model size and our numbers beside the paper's."""
    m, p, tol = stats["mean"], stats["paper"], stats["near_zero_tol"]
    unit = "lines" if stats["config"]["data"]["source"].endswith(("text", "austen")) else "images"
    paper_frac = p.get("fraction_near_zero")
    paper_err = p.get("test_error")
    ours = (
        f"ours: {100 * m['fraction_near_zero']:.1f}% of |λ| ≤ {tol:g}, "
        f"λ ∈ [{m['bottom']:.3g}, {m['top']:.3g}], test error {100 * m['test_error']:.1f}%"
    )
    paper = "paper: " + ", ".join(
        x
        for x in (
            f"{100 * paper_frac:.0f}% of |λ| ≤ {p.get('near_zero_tol', tol):g}"
            if paper_frac
            else "",
            f"λ ∈ [{p['bottom']:g}, {p['top']:g}]" if "top" in p and "bottom" in p else "",
            f"test error {100 * paper_err:.1f}%" if paper_err else "",
            f"{p['n_params']:,} params, {p['runs']} runs" if "n_params" in p else "",
        )
        if x
    )
    return (
        f"{stats['model']} ({stats['n_params']:,} params), {stats['optimizer']}, "
        f"{stats['dataset']}, {stats['n_runs']} runs, Hessian over {stats['n_samples']:,} "
        f"training {unit}, preset '{stats['preset']}'.\n{ours}\n{paper}"
    )


def plan(figure: str, preset: str = "default", device: str = "cpu") -> dict[str, Any]:
    """What a figure will compute, without data or training: parameter count, runs,
    samples, the exact spectrum's memory against what is free (the same rule as
    :func:`spectra.exact_spectrum`'s guard) and a rough time for the eigensolver."""
    cfg: presets.SpectrumFigure = presets.get(preset, figure)
    head = plan_head(figure, preset, cfg)
    n = head["n_params"]
    dtype = getattr(torch, cfg.dtype)
    item = torch.empty((), dtype=dtype).element_size()
    chunk = min(cfg.hessian_chunk or 256, n)
    need = n * n * item + max(4 * chunk * n * item, eigensolver_workspace_bytes(n, dtype, device))
    free = available_memory_bytes(device)
    # Measured (benchmarks/bench_eigensolver.py, MKL in place, one core): float32 n = 4000
    # in ~2.1 CPU s with a fitted exponent 2.74; float64 ~2x.
    solve = 2.1 * (n / 4000) ** 2.74 * (2.0 if cfg.dtype == "float64" else 1.0)
    return {
        **head,
        "runs": cfg.runs,
        "n_hessian": cfg.data.n_hessian,
        "dtype": cfg.dtype,
        "memory_needed_gib": need / 2**30,
        "memory_free_gib": free / 2**30,
        "memory_ok": need <= free,
        "est_solve_seconds_per_run": solve,
    }
