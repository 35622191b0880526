"""The figure presets, as data.

A preset maps each figure name to its configuration: a :class:`SpectrumFigure` for the
Hessian-spectrum figures (Fig 1, 3a, 3b) and a :class:`LandscapeFigure` for the Fig 2
cartoon.  Every field is JSON-serialisable (``dataclasses.asdict``) because the whole
configuration, preset name included, is part of the cache key.

Presets:

- ``default``: the paper's architectures at reduced width (2-4k parameters), the Hessian
  over a few hundred to a few thousand training samples, so that ``make figures`` (all
  four figures from a cold cache) takes a few minutes on 2 CPU cores.
- ``paper``: the paper's sizes (47,658 / 50,890 / 32,640 parameters) and run counts
  (2 / 2 / 5), in float32 (a 50k x 50k matrix is 10 GB), the Hessian over 2,000 training
  images (all 256 lines for the LSTM).  Hours on 2 cores; see ``--dry-run``.
- ``smoke``: tiny networks on synthetic data (no files needed), for the tests.

Fig 3c and ``fisher-compare`` read Adam's moments (:class:`FisherFigure`,
:class:`CompareFigure`); their ``default`` entries take ~1.5-2 min together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = [
    "DataConfig",
    "OptimConfig",
    "TrainedFigure",
    "SpectrumFigure",
    "LandscapeFigure",
    "FisherFigure",
    "CompareFigure",
    "PRESETS",
    "FIGURES",
    "get",
    "as_dict",
]

#: The figures, in the order ``python -m figures all`` makes them.
FIGURES: tuple[str, ...] = ("fig1", "fig2", "fig3a", "fig3b", "fig3c", "fisher-compare")


@dataclass(frozen=True)
class DataConfig:
    """Which samples a figure trains on, tests on and takes the Hessian over.

    Attributes:
        source: ``"mnist"`` or ``"austen"`` (real files, see :mod:`figures.datasets`), or
            ``"synthetic-images"`` / ``"synthetic-text"`` (generated from ``seed``; tests).
        n_train: training samples (images, or lines of text).  ``0`` = the whole split.
        n_test: test samples (images, or lines of text following the training lines).
        n_hessian: the Hessian averages the loss over the first ``n_hessian`` training
            samples (the loss the optimizer minimised, restricted to a fixed subset).
        hessian_batch: samples per batch in the Hessian's products (memory only; the
            operator is the same for any split).
        line_len, vocab_size: character lines (text sources).
        seed: seed of the training subset.
    """

    source: str
    n_train: int
    n_test: int
    n_hessian: int
    hessian_batch: int = 1000
    line_len: int = 32
    vocab_size: int = 96
    seed: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule: ``name`` is one of :data:`figures.optimizers.OPTIMIZERS`, built
    with ``lr``, ``weight_decay`` and (for ``"sgd"``, ``"sam"``, ``"entropy-sgd"``)
    ``momentum`` and ``nesterov``, its other options at their constructor defaults (the
    figures use ``"adam"`` and ``"sgd"``); the learning rate is multiplied by ``decay`` every ``decay_every``
    epochs (0 = never)."""

    name: str
    lr: float
    epochs: int
    batch_size: int
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_every: int = 0
    decay: float = 1.0


@dataclass(frozen=True)
class TrainedFigure:
    """What every figure that trains networks names first: ``model`` (a name in
    :data:`figures.models.REGISTRY`), its ``model_kwargs``, the ``data``
    (:class:`DataConfig`) and the optimizer and schedule ``optim`` (:class:`OptimConfig`);
    :func:`figures.figure_runs.run_config` makes the run configuration from them."""

    model: str
    model_kwargs: dict[str, Any]
    data: DataConfig
    optim: OptimConfig


@dataclass(frozen=True)
class SpectrumFigure(TrainedFigure):
    """One Hessian-spectrum figure: train ``runs`` models, diagonalise each Hessian, plot.

    Attributes:
        model: a name in :data:`figures.models.REGISTRY`; ``model_kwargs`` its arguments.
        data, optim: see :class:`DataConfig`, :class:`OptimConfig`.
        runs: independent runs (seeds ``seed``, ``seed + 1``, ...), overlaid.
        dtype: ``"float32"`` or ``"float64"`` for the Hessian.
        near_zero_tol: the paper's threshold for "near zero" in this figure.
        center: half-width of the central histogram window (None: the plot's default).
        hessian_chunk: Hessian columns per block (speed/memory only; None: the
            library's choice from a 1 GiB tangent budget).
        checkpoint: build the Hessian through the library's resumable row checkpoint
            (in ``<cache>/checkpoints/``), for the hour-long paper-size spectra.
        hessian_backend: the operator's product path for the build (``"auto"``, or
            ``"autograd"`` where ``python -m benchmarks build`` measured double backward
            cheaper per column, as for the conv net of Fig 1); fixed per preset, so the
            build is the same computation on every machine.
        hessian_forward: ``"model"`` (``model(x)``) or ``"unrolled-lstm"`` (the same
            LSTM written as explicit cell steps, which ``torch.func.vmap`` batches; the
            fused ``nn.LSTM`` kernel has no batching rule and is ~10x slower there).
        paper: the paper's numbers for this figure, quoted beside ours.
        note: what differs from the paper, for the caption and JSON.
    """

    runs: int
    near_zero_tol: float
    paper: dict[str, Any]
    seed: int = 0
    dtype: str = "float64"
    center: float | None = None
    hessian_chunk: int | None = None
    checkpoint: bool = False
    hessian_forward: str = "model"
    hessian_backend: str = "auto"
    note: str = ""


@dataclass(frozen=True)
class LandscapeFigure:
    """Fig 2: f(x) = -sum_i depth_i exp(-(x - c_i)^2 / (2 width_i^2)); the wells are
    (depth, centre, width) triples, the first the wide one, the second the sharp one.
    ``gammas`` are the two scopings of the local entropy, ``x_range`` the plotted
    interval and ``step`` the quadrature's grid spacing."""

    wells: tuple[tuple[float, float, float], ...] = ((1.0, -1.5, 0.8), (2.0, 1.5, 0.05))
    gammas: tuple[float, ...] = (1.0, 20.0)
    x_range: tuple[float, float] = (-4.0, 4.0)
    n_points: int = 801
    step: float = 1e-3


@dataclass(frozen=True)
class FisherFigure(TrainedFigure):
    """Fig 3c: train ``runs`` models with Adam, read diag(I) = v_hat - m_hat^2 from the
    optimizer's moments (:func:`spectra.fisher_diagonal_from_adam`), plot both signs.

    ``data.source`` ``"cifar10"`` falls back to Fashion-MNIST (28 x 28, the channel
    repeated to 3) when CIFAR-10 is absent; ``"synthetic-images"`` is for the tests.
    ``data.n_hessian`` is unused (no Hessian is built).  ``unbiased``: the stationary-noise
    correction of :func:`~spectra.fisher_diagonal_from_adam` (False: the paper's formula).
    """

    runs: int
    near_zero_tol: float
    paper: dict[str, Any]
    seed: int = 0
    unbiased: bool = False
    note: str = ""


@dataclass(frozen=True)
class CompareFigure(TrainedFigure):
    """Adam-moment diagonal vs empirical Fisher diagonal vs exact Hessian diagonal on one
    small network: train with Adam, then compute the two exact diagonals over the first
    ``data.n_hessian`` training samples, in ``dtype``.  ``runs`` is 1."""

    near_zero_tol: float
    paper: dict[str, Any]
    runs: int = 1
    seed: int = 0
    dtype: str = "float64"
    note: str = ""


_PAPER_FIG1 = {
    "test_error": 0.024,
    "near_zero_tol": 1e-4,
    "fraction_near_zero": 0.94,
    "top": 40.0,
    "bottom": -0.46,
    "n_params": 47658,
    "runs": 2,
    "optimizer": "Adam",
}
_PAPER_FIG3A = {
    "test_error": 0.025,
    "near_zero_tol": 1e-2,
    "fraction_near_zero": 0.90,
    "n_params": 50890,
    "runs": 2,
    "optimizer": "SGD with momentum",
}
_PAPER_FIG3B = {
    "near_zero_tol": 1e-5,
    "fraction_near_zero": 0.95,
    "n_params": 32640,
    "runs": 5,
    "optimizer": "Adam",
    "text": "256 lines x 32 characters",
}

_PAPER_FIG3C = {
    "test_error": 0.112,
    "near_zero_tol": 1e-5,
    "fraction_near_zero": 0.95,
    "n_params": 1_600_000,
    "n_params_note": "'~1.6 million weights' (Sec 5.1)",
    "runs": 4,
    "optimizer": "Adam",
    "dataset": "CIFAR-10",
}
_PAPER_COMPARE = {
    "near_zero_tol": 1e-5,
    "note": "not in the paper: a check of its proxy "
    "(Adam's moments for the Fisher diagonal, the Fisher for the Hessian)",
}

_DEFAULT: dict[str, Any] = {
    "fig1": SpectrumFigure(
        model="small-lenet",
        model_kwargs={"width": 0.2},
        data=DataConfig("mnist", n_train=10000, n_test=10000, n_hessian=400, hessian_batch=400),
        optim=OptimConfig("adam", lr=3e-3, epochs=15, batch_size=100, decay_every=3, decay=0.5),
        runs=2,
        near_zero_tol=1e-4,
        paper=_PAPER_FIG1,
        dtype="float32",
        hessian_chunk=256,
        note="reduced width 0.2; trained on 10k MNIST images, Hessian over 400 of them",
    ),
    "fig2": LandscapeFigure(),
    "fig3a": SpectrumFigure(
        model="small-mnistfc",
        model_kwargs={"hidden": 4},
        data=DataConfig("mnist", n_train=10000, n_test=10000, n_hessian=2000),
        optim=OptimConfig(
            "sgd",
            lr=0.05,
            epochs=30,
            batch_size=100,
            momentum=0.9,
            nesterov=True,
            decay_every=6,
            decay=0.5,
        ),
        runs=2,
        near_zero_tol=1e-2,
        dtype="float32",
        paper=_PAPER_FIG3A,
        note="reduced hidden width 4; trained on 10k MNIST images, Hessian over 2k of them",
    ),
    "fig3b": SpectrumFigure(
        model="char-lstm-small",
        model_kwargs={"hidden": 8},
        data=DataConfig("austen", n_train=256, n_test=256, n_hessian=64, hessian_batch=64),
        optim=OptimConfig("adam", lr=1e-2, epochs=300, batch_size=32, decay_every=75, decay=0.5),
        runs=2,
        hessian_forward="unrolled-lstm",
        hessian_chunk=128,
        dtype="float32",
        near_zero_tol=1e-5,
        paper=_PAPER_FIG3B,
        note="reduced hidden width 8, 2 runs instead of 5; trained on the paper's 256 x 32 "
        "characters, Hessian over the first 64 lines",
    ),
    "fig3c": FisherFigure(
        model="all-cnn-bn",
        model_kwargs={"width": 0.125},
        data=DataConfig("cifar10", n_train=4000, n_test=2000, n_hessian=0),
        optim=OptimConfig("adam", lr=2e-3, epochs=4, batch_size=64),
        runs=4,
        near_zero_tol=1e-5,
        paper=_PAPER_FIG3C,
        note="reduced width 0.125; 4k training images, 4 epochs (the paper: full width, "
        "full CIFAR-10, trained to 11.2% error)",
    ),
    "fisher-compare": CompareFigure(
        model="small-mnistfc",
        model_kwargs={"hidden": 8},
        data=DataConfig("mnist", n_train=5000, n_test=2000, n_hessian=1000, hessian_batch=1000),
        optim=OptimConfig("adam", lr=3e-3, epochs=8, batch_size=50),
        near_zero_tol=1e-5,
        paper=_PAPER_COMPARE,
        note="small-mnistfc (hidden 8) on 5k MNIST images; Fisher and Hessian diagonals "
        "over the first 1k of them",
    ),
}


def _variant(
    figure: str,
    model_kwargs: dict[str, Any],
    data: DataConfig | None,
    optim: OptimConfig | None,
    note: str,
    **changes: Any,
) -> Any:
    """The default entry of ``figure`` with another size, data, optimizer and note."""
    if data is not None:
        changes["data"] = data
    if optim is not None:
        changes["optim"] = optim
    return replace(_DEFAULT[figure], model_kwargs=model_kwargs, note=note, **changes)


_PAPER: dict[str, Any] = {
    "fig1": _variant(
        "fig1",
        {"width": 1.0},
        DataConfig("mnist", n_train=0, n_test=10000, n_hessian=2000, hessian_batch=200),
        OptimConfig("adam", lr=1e-3, epochs=20, batch_size=128, decay_every=8, decay=0.5),
        "the paper's size; Hessian over 2k training images, so the Gauss-Newton rank "
        "bound forces 62% of the eigenvalues to zero (the build makes n columns, each a "
        "double backward over all samples, in batches of 200: 5.0-5.4 columns/s on 2 CPU "
        "cores, ~2.5 h per run; batches of 1,000 gave 2.3-2.5)",
        hessian_backend="autograd",
        hessian_chunk=None,
        dtype="float32",
        checkpoint=True,
    ),
    "fig2": LandscapeFigure(),
    "fig3a": _variant(
        "fig3a",
        {"hidden": 64},
        DataConfig("mnist", n_train=0, n_test=10000, n_hessian=6000),
        replace(_DEFAULT["fig3a"].optim, batch_size=128, decay_every=10),
        "the paper's parameter count (64 hidden units); Hessian over 6k training images, "
        "so that the Gauss-Newton rank bound N(C-1) = 54,000 exceeds n and forces no zero",
        dtype="float32",
        checkpoint=True,
    ),
    "fig3b": _variant(
        "fig3b",
        {"hidden": 48},
        DataConfig("austen", n_train=256, n_test=256, n_hessian=256, hessian_batch=256),
        OptimConfig("adam", lr=5e-3, epochs=200, batch_size=32, decay_every=50, decay=0.5),
        "the paper's size and run count; the build by double backward (92 ms per column "
        "on 1 thread against 117 ms for the vectorised path, `python -m benchmarks build "
        "--figures fig3b`)",
        runs=5,
        hessian_backend="autograd",
        dtype="float32",
        hessian_chunk=64,
        checkpoint=True,
    ),
    "fig3c": _variant(
        "fig3c",
        {"width": 1.0},
        DataConfig("cifar10", n_train=0, n_test=10000, n_hessian=0),
        OptimConfig("adam", lr=1e-3, epochs=100, batch_size=128, decay_every=30, decay=0.2),
        "full width (1,372,254 parameters; the paper says ~1.6M), full training set, "
        "100 epochs, 4 runs: for a GPU (--device cuda)",
    ),
    "fisher-compare": _variant(
        "fisher-compare",
        {"hidden": 16},
        DataConfig("mnist", n_train=0, n_test=10000, n_hessian=5000, hessian_batch=1000),
        OptimConfig("adam", lr=1e-3, epochs=20, batch_size=100),
        "small-mnistfc (hidden 16) on all of MNIST; Fisher and Hessian diagonals over 5k "
        "training images",
    ),
}


def _synthetic(n_hessian: int, hessian_batch: int = 1000) -> DataConfig:
    """64 synthetic training images, 32 test images (the smoke preset's data)."""
    return DataConfig(
        "synthetic-images", n_train=64, n_test=32, n_hessian=n_hessian, hessian_batch=hessian_batch
    )


_ON_IMAGES = "smoke test on synthetic images"
_SMOKE: dict[str, Any] = {
    "fig1": _variant(
        "fig1",
        {"width": 0.1},
        _synthetic(32, 16),
        OptimConfig("adam", lr=1e-2, epochs=2, batch_size=32),
        _ON_IMAGES,
    ),
    "fig2": LandscapeFigure(n_points=101, step=5e-3),
    "fig3a": _variant(
        "fig3a",
        {"hidden": 2},
        _synthetic(32),
        OptimConfig("sgd", lr=0.05, epochs=2, batch_size=32, momentum=0.9),
        _ON_IMAGES,
    ),
    "fig3b": _variant(
        "fig3b",
        {"hidden": 2, "vocab": 12},
        DataConfig(
            "synthetic-text",
            n_train=8,
            n_test=4,
            n_hessian=8,
            hessian_batch=4,
            line_len=6,
            vocab_size=12,
        ),
        OptimConfig("adam", lr=1e-2, epochs=2, batch_size=4),
        "smoke test on synthetic text",
    ),
    "fig3c": _variant(
        "fig3c",
        {"width": 0.05, "dropout": 0.0},
        _synthetic(0),
        OptimConfig("adam", lr=1e-2, epochs=2, batch_size=16),
        _ON_IMAGES,
        runs=2,
    ),
    "fisher-compare": _variant(
        "fisher-compare",
        {"hidden": 2},
        _synthetic(32, 16),
        OptimConfig("adam", lr=1e-2, epochs=3, batch_size=16),
        _ON_IMAGES,
    ),
}

PRESETS: dict[str, dict[str, Any]] = {"default": _DEFAULT, "paper": _PAPER, "smoke": _SMOKE}


def get(preset: str, figure: str) -> Any:
    """The configuration of ``figure`` in ``preset`` (KeyError naming the valid choices)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if figure not in PRESETS[preset]:
        raise KeyError(
            f"preset {preset!r} has no figure {figure!r}; it has {sorted(PRESETS[preset])}"
        )
    return PRESETS[preset][figure]


def as_dict(config: Any) -> dict[str, Any]:
    """A configuration as a plain JSON-ready dict (tuples become lists)."""
    import json

    return json.loads(json.dumps(asdict(config)))
