"""The steps every Hessian-spectrum figure shares, written once.

data (real or synthetic) -> train-or-load weights (cached) -> spectrum-or-load (cached)
-> statistics -> plot -> ``<name>.json/.png/.pdf``.

:func:`run_spectrum_figure` is the whole pipeline for one figure; the figure modules
(:mod:`figures.fig1`, :mod:`figures.fig3a`, :mod:`figures.fig3b`) only supply their name
and caption.  Cache keys hold the full configuration: preset, figure, seed, model,
optimizer, the data's identity (a hash of the tensors actually used) and a code version
(a hash of the source files that compute the result).
"""

from __future__ import annotations

import hashlib
import json
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spectra
from spectra.dense_eigensolver import eigensolver_workspace_bytes
from spectra.exact import available_memory_bytes

from . import data as fdata
from . import models, presets, report
from .cache import Cache, code_version, config_key
from .harness import build_optimizer
from .loop import evaluate_error, evaluate_loss, fit

__all__ = [
    "FigureData",
    "load_data",
    "loss_for",
    "make_optimizer",
    "train_or_load",
    "spectrum_or_load",
    "run_spectrum_figure",
    "plan_spectrum_figure",
    "sequence_cross_entropy",
]

_ROOT = Path(__file__).resolve().parent.parent
#: Source files whose contents version the cached weights and spectra.
_TRAIN_CODE_FILES = [_ROOT / "figures" / f for f in ("loop.py", "models.py")]
_SPECTRUM_CODE = [
    _ROOT / "spectra" / f
    for f in ("exact.py", "hessian.py", "curvature.py", "batches.py", "parameters.py",
              "dense_eigensolver.py", "spectrum.py")
]
_DATASET_NAMES = {
    "mnist": "MNIST",
    "austen": "Jane Austen's novels (janeaustenr)",
    "synthetic-images": "synthetic images (tests)",
    "synthetic-text": "synthetic text (tests)",
}


# ------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------


@dataclass
class FigureData:
    """Tensors of one figure: training set, test set, the Hessian's batches, and the
    data's identity (SHA-256 of the tensors, part of every cache key)."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    hessian: list[tuple[Tensor, Tensor]]
    dataset: str
    identity: str


def _tensor_digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _synthetic_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Ten noisy class prototypes, 1 x 28 x 28 in [0, 1] (MNIST-shaped, learnable)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, 10, (n,), generator=g)
    x = (protos[y] + 0.3 * torch.randn(n, 1, 28, 28, generator=g)).clamp_(0, 1)
    return x, y


def _synthetic_text(n_chars: int, seed: int) -> str:
    """A seeded pseudo-random string of lower-case letters and spaces."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(string.ascii_lowercase[:8] + " "))
    return "".join(alphabet[rng.integers(0, len(alphabet), n_chars)])


def load_data(cfg: presets.DataConfig) -> FigureData:
    """Assemble a figure's data from its :class:`~figures.presets.DataConfig`.

    Images: a seeded subset of ``n_train`` training images (all if 0), the first
    ``n_test`` test images.  Text: ``n_train`` lines of ``line_len`` characters from the
    start of the text, then ``n_test`` lines right after them for testing.  The Hessian
    uses the first ``n_hessian`` training samples.  Missing files raise
    :class:`figures.data.MissingDataError` (whose message names ``make data``).
    """
    if cfg.source in ("mnist", "synthetic-images"):
        if cfg.source == "mnist":
            x, y = fdata.load_mnist(split="train")
            xt, yt = fdata.load_mnist(split="test")
        else:
            x, y = _synthetic_images(max(cfg.n_train, 1), cfg.seed)
            xt, yt = _synthetic_images(cfg.n_test, cfg.seed + 1)
        if cfg.n_train and cfg.n_train < len(x):
            x, y = fdata.subsample(x, y, cfg.n_train, seed=cfg.seed)
        train_set, test_set = (x, y), (xt[: cfg.n_test], yt[: cfg.n_test])
    elif cfg.source in ("austen", "synthetic-text"):
        need = (cfg.n_train + cfg.n_test) * cfg.line_len + 1
        text = fdata.load_austen() if cfg.source == "austen" else _synthetic_text(need, cfg.seed)
        tr = fdata.char_lines(text, cfg.n_train, cfg.line_len, cfg.vocab_size, start=0)
        te = fdata.char_lines(text, cfg.n_test, cfg.line_len, cfg.vocab_size,
                              start=cfg.n_train * cfg.line_len)
        train_set, test_set = (tr.inputs, tr.targets), (te.inputs, te.targets)
    else:
        raise ValueError(f"unknown data source {cfg.source!r}; choose from {sorted(_DATASET_NAMES)}")
    n_h = min(cfg.n_hessian, len(train_set[0]))
    hx, hy = train_set[0][:n_h], train_set[1][:n_h]
    hessian = [(hx[i : i + cfg.hessian_batch], hy[i : i + cfg.hessian_batch])
               for i in range(0, n_h, cfg.hessian_batch)]
    identity = _tensor_digest(*train_set, *test_set)
    return FigureData(train_set, test_set, hessian, _DATASET_NAMES[cfg.source], identity)


# ------------------------------------------------------------------------------------
# Model, loss, optimizer
# ------------------------------------------------------------------------------------


def sequence_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position: logits (N, L, V), targets (N, L)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def loss_for(cfg: presets.SpectrumFigure) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy per image, or per character for text."""
    return sequence_cross_entropy if "text" in cfg.data.source or cfg.data.source == "austen" \
        else nn.CrossEntropyLoss()


def make_optimizer(
    cfg: presets.OptimConfig, params: Any
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer (:func:`figures.harness.build_optimizer`, so any of its names) and,
    if ``decay_every``, a StepLR schedule stepped per epoch."""
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name in ("sgd", "sam", "entropy-sgd"):
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    opt = build_optimizer(cfg.name, params, kwargs)
    sched = (torch.optim.lr_scheduler.StepLR(opt, cfg.decay_every, cfg.decay)
             if cfg.decay_every else None)
    return opt, sched


def unrolled_lstm_forward(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model(inputs)`` for a one-layer :class:`~figures.models.CharLSTM`, written as
    explicit LSTM cell steps (gates i, f, g, o as in ``nn.LSTM``).

    The same function of the same parameters, so the same Hessian; but every op has a
    ``torch.func.vmap`` batching rule, unlike the fused ``nn.LSTM`` kernel, which makes
    the Hessian's block products about 10x faster.  Inputs (N, L, V) one-hot floats.
    """
    lstm = model.lstm
    if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first:
        raise ValueError("unrolled_lstm_forward handles one-layer, batch-first LSTMs only")
    if not inputs.is_floating_point():
        inputs = F.one_hot(inputs, lstm.input_size).to(lstm.weight_ih_l0.dtype)
    w_hh = lstm.weight_hh_l0
    pre = inputs @ lstm.weight_ih_l0.T
    if lstm.bias:
        pre = pre + (lstm.bias_ih_l0 + lstm.bias_hh_l0)
    h = inputs.new_zeros(inputs.shape[0], lstm.hidden_size)
    c = torch.zeros_like(h)
    outs = []
    for step in pre.unbind(1):  # unbind, not pre[:, t]: one backward node, not L
        i, f, g, o = (step + h @ w_hh.T).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return model.out(torch.stack(outs, dim=1))


_FORWARDS: dict[str, Callable[[nn.Module, Any], Any] | None] = {
    "model": None,
    "unrolled-lstm": unrolled_lstm_forward,
}


def _build_model(cfg: presets.SpectrumFigure, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(cfg.model, **cfg.model_kwargs)


# ------------------------------------------------------------------------------------
# Cached steps
# ------------------------------------------------------------------------------------


def _weights_config(figure: str, preset: str, cfg: presets.SpectrumFigure, seed: int,
                    data: FigureData) -> dict[str, Any]:
    return {
        "kind": "weights",
        "figure": figure,
        "preset": preset,
        "seed": seed,
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "data": asdict(cfg.data),
        "data_identity": data.identity,
        "optim": asdict(cfg.optim),
        "code": code_version([*_TRAIN_CODE_FILES, load_data, _synthetic_images, _synthetic_text,
                              loss_for, sequence_cross_entropy, make_optimizer, build_optimizer,
                              _build_model,
                              train_or_load]),
        "torch": torch.__version__,
    }


def train_or_load(
    figure: str, preset: str, cfg: presets.SpectrumFigure, seed: int, data: FigureData,
    device: str, cache: Cache, progress: bool = True,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Trained model for one run (from the cache if present), its training record
    (losses, errors, seconds) and the configuration that keys it."""
    config = _weights_config(figure, preset, cfg, seed, data)
    loss_fn = loss_for(cfg)

    def compute() -> tuple[dict[str, Tensor], dict[str, Any]]:
        model = _build_model(cfg, seed).to(device)
        opt, sched = make_optimizer(cfg.optim, model.parameters())
        result = fit(model, loss_fn, data.train, opt, cfg.optim.epochs, cfg.optim.batch_size,
                       seed, device, scheduler=sched, progress=progress,
                       desc=f"{figure} run seed={seed}")
        record = {
            **result.as_dict(),
            "train_loss": evaluate_loss(model, loss_fn, data.train, device=device),
            "train_error": evaluate_error(model, data.train, device=device),
            "test_error": evaluate_error(model, data.test, device=device),
        }
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return state, record

    def save(value: tuple[dict[str, Tensor], dict[str, Any]], folder: Path) -> None:
        torch.save(value[0], folder / "model.pt")
        (folder / "train.json").write_text(json.dumps(value[1], indent=1))

    def read(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        return state, json.loads((folder / "train.json").read_text())

    (state, record), hit = cache.get_or_compute(config, compute, save, read)
    model = _build_model(cfg, seed)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, {**record, "weights_cached": hit}, config


def spectrum_or_load(
    model: nn.Module, cfg: presets.SpectrumFigure, data: FigureData, weights_config: dict,
    cache: Cache, name: str, progress: bool = True,
) -> tuple[spectra.Spectrum, bool]:
    """The exact Hessian spectrum of ``model`` over the figure's Hessian batches
    (from the cache if present); returns ``(spectrum, hit)``."""
    config = {
        "kind": "spectrum",
        "weights": weights_config,
        "n_hessian": cfg.data.n_hessian,
        "hessian_batch": cfg.data.hessian_batch,
        "dtype": cfg.dtype,
        "chunk": cfg.hessian_chunk,
        "forward": cfg.hessian_forward,
        "name": name,
        "code": code_version([*_SPECTRUM_CODE, unrolled_lstm_forward, spectrum_or_load]),
    }

    checkpoint = None
    if cache.enabled and cfg.checkpoint:
        checkpoint = cache.root / "checkpoints" / config_key(config)

    def compute() -> spectra.Spectrum:
        return spectra.exact_spectrum(model, loss_for(cfg), data.hessian,
                                      dtype=getattr(torch, cfg.dtype), name=name,
                                      progress=progress, chunk_size=cfg.hessian_chunk,
                                      forward=_FORWARDS[cfg.hessian_forward],
                                      checkpoint=checkpoint)

    return cache.get_or_compute(
        config, compute,
        save=lambda s, folder: s.save(folder / "spectrum.npz"),
        read=lambda folder: spectra.Spectrum.load(folder / "spectrum.npz"),
    )


def _grad_norm(model: nn.Module, loss_fn: Callable, batches: list[tuple[Tensor, Tensor]],
               device: str) -> float:
    """||grad L|| of the loss the Hessian is taken of (sample-weighted over batches)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    n = sum(len(y) for _, y in batches)
    for x, y in batches:
        (loss_fn(model(x.to(device)), y.to(device)) * (len(y) / n)).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return float(g.norm())


# ------------------------------------------------------------------------------------
# The figure
# ------------------------------------------------------------------------------------

_TOLS = (1e-5, 1e-4, 1e-3, 1e-2)


def _run_stats(s: spectra.Spectrum, tol: float) -> dict[str, Any]:
    return {
        "n_params": s.n_params,
        "n_samples": s.n_samples,
        "loss_at_point": s.loss,
        "fraction_near_zero": s.fraction_near_zero(tol),
        "fraction_near_zero_at": {f"{t:g}": s.fraction_near_zero(t) for t in _TOLS},
        "fraction_negative": s.fraction_negative(),
        "top": float(s.top(1)[0]),
        "bottom": float(s.bottom(1)[0]),
        "trace": s.trace(),
        "build_seconds": s.info.get("build_seconds"),
        "solve_seconds": s.info.get("solve_seconds"),
    }


def run_spectrum_figure(
    figure: str,
    preset: str,
    out_dir: str | Path,
    device: str = "cpu",
    use_cache: bool = True,
    caption: Callable[[dict[str, Any]], str] | None = None,
    title: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the runs, take their exact spectra, write ``<figure>.png/.pdf/.json``.

    Args:
        figure, preset: which configuration (:func:`figures.presets.get`).
        out_dir: output folder; the cache lives in ``<out_dir>/cache``.
        device: ``"cpu"`` or ``"cuda"``.
        use_cache: read and write the cache (``--no-cache`` turns it off).
        caption: builds the caption from the statistics (default: a generic one).
        title: plot title.

    Returns the statistics written to ``<figure>.json``.
    """
    t0 = time.perf_counter()
    cfg: presets.SpectrumFigure = presets.get(preset, figure)
    out_dir = Path(out_dir)
    cache = Cache(out_dir / "cache", enabled=use_cache)
    data = load_data(cfg.data)
    loss_fn = loss_for(cfg)
    runs, spectra_list = [], []
    for i in range(cfg.runs):
        seed = cfg.seed + i
        model, record, wconfig = train_or_load(figure, preset, cfg, seed, data, device, cache,
                                               progress)
        s, hit = spectrum_or_load(model, cfg, data, wconfig, cache, f"run {i + 1}", progress)
        spectra_list.append(s)
        runs.append({"seed": seed, **record, "spectrum_cached": hit,
                     "grad_norm": _grad_norm(model, loss_fn, data.hessian, device),
                     **_run_stats(s, cfg.near_zero_tol)})
    mean_keys = ("fraction_near_zero", "top", "bottom", "trace", "test_error", "train_loss",
                 "fraction_negative")
    stats: dict[str, Any] = {
        "figure": figure,
        "preset": preset,
        "dataset": data.dataset,
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "optimizer": cfg.optim.name,
        "n_params": runs[0]["n_params"],
        "n_samples": runs[0]["n_samples"],
        "n_train": len(data.train[0]),
        "n_test": len(data.test[0]),
        "dtype": cfg.dtype,
        "near_zero_tol": cfg.near_zero_tol,
        "n_runs": cfg.runs,
        "mean": {k: float(np.mean([r[k] for r in runs])) for k in mean_keys},
        "runs": runs,
        "paper": cfg.paper,
        "note": cfg.note,
        "config": presets.as_dict(cfg),
        "data_identity": data.identity,
    }
    stats["caption"] = (caption or default_caption)(stats)
    fig = spectra.plot.spectrum(spectra_list, near_zero_tol=cfg.near_zero_tol, center=cfg.center)
    central = fig.axes[0]
    if central.get_legend() is not None:  # keep it clear of the "peak clipped" note at the top
        central.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.88))
    report.add_caption(fig, stats["caption"], title=title)
    stats["seconds"] = time.perf_counter() - t0
    report.write_outputs(out_dir, figure, fig, stats)
    return stats


def default_caption(stats: dict[str, Any]) -> str:
    """Caption naming the preset, data, model size and our numbers beside the paper's."""
    m, p, tol = stats["mean"], stats["paper"], stats["near_zero_tol"]
    unit = "lines" if stats["config"]["data"]["source"].endswith(("text", "austen")) \
        else "images"
    paper_frac = p.get("fraction_near_zero")
    paper_err = p.get("test_error")
    ours = (f"ours: {100 * m['fraction_near_zero']:.1f}% of |λ| ≤ {tol:g}, "
            f"λ ∈ [{m['bottom']:.3g}, {m['top']:.3g}], test error {100 * m['test_error']:.1f}%")
    paper = "paper: " + ", ".join(
        x for x in (
            f"{100 * paper_frac:.0f}% of |λ| ≤ {p.get('near_zero_tol', tol):g}" if paper_frac else "",
            f"λ ∈ [{p['bottom']:g}, {p['top']:g}]" if "top" in p and "bottom" in p else "",
            f"test error {100 * paper_err:.1f}%" if paper_err else "",
            f"{p['n_params']:,} params, {p['runs']} runs" if "n_params" in p else "",
        ) if x
    )
    return (f"{stats['model']} ({stats['n_params']:,} params), {stats['optimizer']}, "
            f"{stats['dataset']}, {stats['n_runs']} runs, Hessian over {stats['n_samples']:,} "
            f"training {unit}, preset '{stats['preset']}'.\n{ours}\n{paper}")


def plan_spectrum_figure(figure: str, preset: str, device: str = "cpu") -> dict[str, Any]:
    """What a figure will compute, without data or training: parameter count, runs,
    samples, the exact spectrum's memory against what is free (the same rule as
    :func:`spectra.exact_spectrum`'s guard) and a rough time for the eigensolver."""
    cfg: presets.SpectrumFigure = presets.get(preset, figure)
    n = models.count_parameters(_build_model(cfg, cfg.seed))
    dtype = getattr(torch, cfg.dtype)
    item = torch.empty((), dtype=dtype).element_size()
    chunk = min(cfg.hessian_chunk or 256, n)
    need = n * n * item + max(4 * chunk * n * item, eigensolver_workspace_bytes(n, dtype, device))
    free = available_memory_bytes(device)
    # Measured on 2 cores: float32 n = 4000 in ~1.6 s; float64 ~2x; O(n^3).
    solve = 1.6 * (n / 4000) ** 3 * (2.0 if cfg.dtype == "float64" else 1.0)
    return {
        "figure": figure, "preset": preset, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
        "n_params": n, "runs": cfg.runs, "n_train": cfg.data.n_train or "all",
        "n_hessian": cfg.data.n_hessian, "dtype": cfg.dtype,
        "memory_needed_gib": need / 2**30, "memory_free_gib": free / 2**30,
        "memory_ok": need <= free, "est_solve_seconds_per_run": solve,
    }
