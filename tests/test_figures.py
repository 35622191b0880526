"""Tests for the figure scripts: Fig 2's quadrature, the cache, the training loop, the
plotting layout and every figure's run() on the synthetic 'smoke' preset (no data files,
no network)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SPECTRUM_KEYS
from torch import nn

import spectra
from figures import catalog, cli, fig2, models, presets, report, spectrum_figure
from figures.cache import MARKER, Cache, config_key
from figures.figure_runs import run_config
from figures.harness import train
from figures.loop import ImageStream, evaluate_metrics, run_loop
from figures.models import char_lstm_small, unrolled_lstm_forward
from figures.request import FigureRequest
from figures.tasks import build_task

# --------------------------------------------------------------------------------------
# Fig 2: local entropy by quadrature
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,c,gamma", [(3.0, 0.7, 0.5), (40.0, -1.2, 5.0), (0.2, 0.0, 20.0)])
def test_local_entropy_matches_gaussian_closed_form(k: float, c: float, gamma: float) -> None:
    """f = k/2 (x - c)^2: the integral of exp(-k/2 (x'-c)^2 - gamma/2 (x-x')^2) is Gaussian,
    F = 1/2 log(2 pi / (k + gamma)) - k gamma / (2 (k + gamma)) (x - c)^2."""
    x = np.linspace(-3, 3, 41)
    numeric = fig2.local_entropy(
        lambda z: 0.5 * k * (z - c) ** 2, x, gamma, bounds=(-40.0, 40.0), step=2e-3
    )
    exact = 0.5 * math.log(2 * math.pi / (k + gamma)) - k * gamma / (2 * (k + gamma)) * (x - c) ** 2
    np.testing.assert_allclose(numeric, exact, rtol=0, atol=1e-8)


def test_local_entropy_scalar_input_and_bad_gamma() -> None:
    value = fig2.local_entropy(lambda z: 0.0 * z, 0.3, 2.0)
    assert np.ndim(value) == 0
    assert value == pytest.approx(0.5 * math.log(2 * math.pi / 2.0), abs=1e-10)
    with pytest.raises(ValueError):
        fig2.local_entropy(lambda z: z, 0.0, 0.0)


def test_negative_local_entropy_prefers_the_wide_valley() -> None:
    cfg = presets.get("default", "fig2")
    f = fig2.wells(cfg.wells)
    x = np.linspace(*cfg.x_range, 801)
    (_, c_wide, _), (_, c_sharp, _) = cfg.wells
    assert abs(x[np.argmin(f(x))] - c_sharp) < 0.02  # f's global minimum is the sharp one
    for gamma in cfg.gammas:
        negF = -fig2.local_entropy(f, x, gamma, step=cfg.step)
        assert abs(x[np.argmin(negF)] - c_wide) < 0.5, gamma


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def _counting(value: dict):
    calls = {"n": 0}

    def compute() -> dict:
        calls["n"] += 1
        return value

    def save(v: dict, folder: Path) -> None:
        (folder / "v.json").write_text(json.dumps(v))

    def read(folder: Path) -> dict:
        return json.loads((folder / "v.json").read_text())

    return calls, compute, save, read


def test_cache_key_changes_with_any_config_field() -> None:
    base = {"preset": "default", "seed": 0, "data": {"n": 10}, "code": "abc"}
    keys = {config_key(base)}
    for change in ({"preset": "paper"}, {"seed": 1}, {"data": {"n": 11}}, {"code": "abd"}):
        keys.add(config_key({**base, **change}))
    assert len(keys) == 5
    assert config_key(dict(reversed(list(base.items())))) == config_key(base)  # order-free


def test_cache_roundtrip_and_hit(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    calls, compute, save, read = _counting({"a": 1})
    config = {"x": 1}
    assert cache.get_or_compute(config, compute, save, read) == ({"a": 1}, False)
    assert cache.get_or_compute(config, compute, save, read) == ({"a": 1}, True)
    assert calls["n"] == 1
    entry = cache.entry_dir(config_key(config))
    assert (entry / MARKER).exists() and (entry / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize("damage", ["corrupt", "no_marker", "bad_marker", "missing_file"])
def test_cache_damaged_entry_is_recomputed(tmp_path: Path, damage: str) -> None:
    cache = Cache(tmp_path)
    calls, compute, save, read = _counting({"a": 1})
    config = {"x": 2}
    cache.get_or_compute(config, compute, save, read)
    entry = cache.entry_dir(config_key(config))
    if damage == "corrupt":
        (entry / "v.json").write_text('{"a": 9')  # truncated
    elif damage == "no_marker":
        (entry / MARKER).unlink()  # a write that never finished
    elif damage == "bad_marker":
        (entry / MARKER).write_text("not json")
    else:
        (entry / "v.json").unlink()
    value, hit = cache.get_or_compute(config, compute, save, read)
    assert (value, hit, calls["n"]) == ({"a": 1}, False, 2)
    assert cache.is_complete(config_key(config))


def test_cache_failed_write_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path)

    def save(v: dict, folder: Path) -> None:
        (folder / "part").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.get_or_compute({"x": 3}, lambda: {"a": 1}, save, lambda f: {})
    assert list(tmp_path.iterdir()) == []


def test_cache_disabled_always_computes(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", enabled=False)
    calls, compute, save, read = _counting({"a": 1})
    for _ in range(2):
        assert cache.get_or_compute({"x": 4}, compute, save, read) == ({"a": 1}, False)
    assert calls["n"] == 2 and not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------
# Training loop and the unrolled LSTM
# --------------------------------------------------------------------------------------


def _toy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    return x, (x[:, 0] > 0).long()


def _loop(
    model: nn.Module, opt: torch.optim.Optimizer, epochs: int, batch_size: int = 16
) -> list[float]:
    """run_loop over the toy data, one boundary per pass: the running losses."""
    x, y = _toy()
    losses: list[float] = []
    stream = ImageStream(x, y, batch_size, seed=0, drop_last=False)
    run_loop(
        model,
        opt,
        stream,
        total_steps=epochs * stream.per_pass,
        every=1,
        unit="steps",
        on_boundary=lambda counters, running: losses.append(running.loss) or False,
        progress=False,
    )
    return losses


def test_figure_run_matches_a_hand_written_training_loop(tmp_path: Path) -> None:
    """A figure's run through harness.train (StepLR-style decay as milestones, the last
    short batch kept, the RNG seeded with the run's seed) gives the weights of the plain
    loop the figures used to run: bit for bit."""
    cfg = replace(
        presets.get("smoke", "fig1"),
        optim=presets.OptimConfig(
            "adam", lr=1e-2, epochs=4, batch_size=24, decay_every=2, decay=0.5
        ),
    )
    seed = 3
    config = run_config("fig1", cfg, seed)
    result = train(config, tmp_path, progress=False)
    x, y = build_task(config).splits["train"]
    torch.manual_seed(seed)
    model = models.build(cfg.model, **cfg.model_kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    torch.manual_seed(seed)
    model.train()
    for epoch in range(4):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 24):  # 64 samples: 24, 24, 16
            idx = perm[i : i + 24]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    for (k, a), b in zip(
        model.state_dict().items(), result.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    assert [row["steps"] for row in result.log] == [3, 6, 9, 12]
    assert [row["lr"] for row in result.log] == [1e-2, 5e-3, 5e-3, 2.5e-3]


def test_loop_supports_closure_optimizers_and_learns() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    losses = _loop(model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), 2, 64)
    assert losses[-1] < losses[0]
    weights = []
    for _ in range(2):  # the same seeds give the same weights
        torch.manual_seed(3)
        model = nn.Linear(5, 2)
        losses = _loop(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), 5)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1]) and len(losses) == 5
    x, y = _toy()
    assert losses[-1] < losses[0] and evaluate_metrics(model, (x, y))["error"] < 0.2


def test_unrolled_lstm_is_the_same_function() -> None:
    torch.manual_seed(0)
    model = char_lstm_small(hidden=3, vocab=7)
    x = torch.nn.functional.one_hot(torch.randint(0, 7, (4, 5)), 7).float()
    torch.testing.assert_close(unrolled_lstm_forward(model, x), model(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Plotting API
# --------------------------------------------------------------------------------------


def test_spectrum_plot_has_centre_and_two_insets_and_caption() -> None:
    rng = np.random.default_rng(0)
    ev = np.concatenate([rng.normal(0, 1e-6, 90), rng.uniform(0.01, 5, 8), [-0.05, -0.01]])
    runs = [
        spectra.Spectrum.from_eigenvalues(ev * s, name=f"run {i}") for i, s in enumerate((1.0, 1.1))
    ]
    fig = spectra.plot.spectrum(runs, near_zero_tol=1e-4, title="t")
    n_axes = len(fig.axes)
    assert n_axes == 3  # central histogram + negative and positive tail insets
    central, negative, positive = (ax.get_position() for ax in fig.axes)
    assert negative.y0 > central.y1 and positive.y0 > central.y1  # the insets sit above it
    assert negative.x1 < positive.x0  # negative tail on the left
    report.add_caption(fig, "line one\nline two")
    assert len(fig.axes) == n_axes
    assert any("line two" in t.get_text() for t in fig.texts)
    central = fig.axes[0]
    assert central.get_yscale() == "log" and central.get_position().y0 > 0.1


# --------------------------------------------------------------------------------------
# Every figure on the smoke preset (synthetic data)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("figs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead (as the CLI does)
    try:
        results = {
            name: catalog.run(name, FigureRequest("smoke", out, progress=False))
            for name in presets.FIGURES
        }
        yield out, results
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", presets.FIGURES)
def test_figure_writes_png_pdf_json(smoke_out: tuple[Path, dict], name: str) -> None:
    out, results = smoke_out
    for ext in ("png", "pdf", "json"):
        assert (out / f"{name}.{ext}").stat().st_size > 0
    stats = json.loads((out / f"{name}.json").read_text())
    assert stats["preset"] == "smoke" and "paper" in stats and "caption" in stats
    if name == "fig2":
        assert stats["minimum_of_negF_in_wide_valley"] is True
        return
    cfg = presets.get("smoke", name)
    assert len(stats["runs"]) == cfg.runs == stats["n_runs"]
    for run in stats["runs"]:
        assert SPECTRUM_KEYS <= run.keys()
        assert run["n_params"] == stats["n_params"] and run["bottom"] <= run["top"]
    assert stats["near_zero_tol"] == cfg.paper["near_zero_tol"]
    assert SPECTRUM_KEYS & set(stats["mean"]) >= {"fraction_near_zero", "test_error", "top"}


def test_rerun_reads_weights_and_spectra_from_cache(smoke_out: tuple[Path, dict]) -> None:
    out, results = smoke_out
    again = catalog.run("fig3a", FigureRequest("smoke", out, progress=False))
    assert all(r["weights_cached"] and r["spectrum_cached"] for r in again["runs"])
    assert again["mean"] == results["fig3a"]["mean"]


def test_runs_shared_out_by_only_runs_make_the_same_figure(
    smoke_out: tuple[Path, dict], tmp_path: Path
) -> None:
    """Two calls that each take a share of the runs, then a plain call, give the figure a
    single call gives; the shares write no figure and the plain call recomputes nothing."""
    _, results = smoke_out
    n_runs = presets.get("smoke", "fig3a").runs
    assert n_runs >= 2
    shares = [(n_runs,), tuple(range(1, n_runs))]
    for share in shares:
        part = catalog.run(
            "fig3a", FigureRequest("smoke", tmp_path, progress=False, only_runs=share)
        )
        assert part["partial"] and part["runs_total"] == n_runs
        assert [r["seed"] for r in part["runs"]] == [
            presets.get("smoke", "fig3a").seed + k - 1 for k in share
        ]
        assert not (tmp_path / "fig3a.json").exists()
    whole = catalog.run("fig3a", FigureRequest("smoke", tmp_path, progress=False))
    assert all(r["weights_cached"] and r["spectrum_cached"] for r in whole["runs"])
    for key in ("fraction_near_zero", "top", "bottom", "test_error"):
        assert whole["mean"][key] == pytest.approx(
            results["fig3a"]["mean"][key], rel=1e-6, abs=1e-9
        )
    assert (tmp_path / "fig3a.json").exists()


def test_only_runs_refuses_bad_shares_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n_runs = presets.get("smoke", "fig3a").runs
    base = ["--preset", "smoke", "--out", str(tmp_path)]
    for argv, message in (
        (["fig3a", *base, "--only-runs", str(n_runs + 1)], f"runs 1..{n_runs}"),
        (["fig3a", *base, "--only-runs", "0"], f"runs 1..{n_runs}"),
        (["fig3a", *base, "--only-runs", "1", "1"], "names a run twice"),
        (["fig3a", *base, "--only-runs", "1", "--no-cache"], "drop --no-cache"),
        (["fig2", *base, "--only-runs", "1"], "not to 'fig2'"),
        (["all", *base, "--only-runs", "1"], "not to 'all'"),
    ):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, cached or written
    with pytest.raises(ValueError, match="spectrum figures"):
        catalog.run("fig3c", FigureRequest("smoke", tmp_path, only_runs=(1,)))


def test_cli_only_runs_says_where_the_share_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fig3a", "--preset", "smoke", "--out", str(tmp_path), "--only-runs", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "runs 1 of" in out and "without --only-runs" in out
    assert not (tmp_path / "fig3a.json").exists()


def test_runs_stored_elsewhere_make_the_figure_without_training(
    smoke_out: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs computed with --runs-dir and no cache (as on a lent GPU, one call each),
    then a call in another output folder: the figure equals the one computed in one
    go, and the last call trains and builds nothing."""
    _, results = smoke_out
    runs_dir = tmp_path / "runs"
    n_runs = presets.get("smoke", "fig3a").runs
    for k in range(1, n_runs + 1):
        request = FigureRequest(
            "smoke",
            tmp_path / f"machine{k}",
            use_cache=False,
            progress=False,
            only_runs=(k,),
            runs_dir=runs_dir,
        )
        assert catalog.run("fig3a", request)["partial"]
    assert sorted(p.name for p in runs_dir.iterdir()) == sorted(
        f"fig3a-run{k}.{ext}" for k in range(1, n_runs + 1) for ext in ("json", "npz")
    )

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(spectrum_figure, "trained_run", no_training)
    whole = catalog.run(
        "fig3a", FigureRequest("smoke", tmp_path / "here", progress=False, runs_dir=runs_dir)
    )
    for key in ("fraction_near_zero", "top", "bottom", "test_error"):
        assert whole["mean"][key] == pytest.approx(
            results["fig3a"]["mean"][key], rel=1e-6, abs=1e-9
        )
    # the figure-level statistics agree as well
    assert whole["sample_rank_bound"] == results["fig3a"]["sample_rank_bound"]
    for stored, computed in zip(whole["runs"], results["fig3a"]["runs"], strict=True):
        assert stored["grad_norm"] == pytest.approx(computed["grad_norm"], rel=1e-6)
    assert all(r["stored_in"] and r["provenance"]["device"] == "cpu" for r in whole["runs"])
    assert (tmp_path / "here" / "fig3a.json").exists()


def test_a_stored_run_of_another_problem_or_with_another_spectrum_is_refused(
    tmp_path: Path,
) -> None:
    runs_dir = tmp_path / "runs"
    request = FigureRequest(
        "smoke", tmp_path, use_cache=False, progress=False, only_runs=(1,), runs_dir=runs_dir
    )
    catalog.run("fig3a", request)
    meta_path = runs_dir / "fig3a-run1.json"
    meta = json.loads(meta_path.read_text())
    changed = {
        **meta,
        "problem": {**meta["problem"], "n_hessian": 1 + meta["problem"]["n_hessian"]},
    }
    meta_path.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="another problem .*n_hessian"):
        catalog.run("fig3a", request)
    meta_path.write_text(json.dumps(meta))
    npz = runs_dir / "fig3a-run1.npz"
    npz.write_bytes(npz.read_bytes() + b"0")
    with pytest.raises(ValueError, match="not the spectrum"):
        catalog.run("fig3a", request)
    meta_path.write_text('{"problem": ')  # cut short
    with pytest.raises(ValueError, match="is not a stored run"):
        catalog.run("fig3a", request)


def test_runs_dir_is_refused_for_figures_without_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fig2", "--preset", "smoke", "--out", str(tmp_path), "--runs-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "--runs-dir applies to one spectrum figure" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def test_cli_list_unknown_and_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    assert "fig3b" in capsys.readouterr().out
    assert cli.main(["fig9"]) == 2
    err = capsys.readouterr().err
    assert "fig9" in err and "fig1" in err and "all" in err
    assert cli.main(["all", "--preset", "smoke", "--dry-run"]) == 0
    plans = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["figure"] for p in plans] == list(presets.FIGURES)
    assert all(p["memory_ok"] for p in plans if "memory_ok" in p)


def test_one_cli_runs_the_experiments_and_lists_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tuple(catalog.FIGURES) == presets.FIGURES
    assert cli.main(["table1", "mnistfc", "--table-only", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table1-mnistfc.md").read_text()
    assert table in capsys.readouterr().out and table.count("not run") == 2
    assert (
        cli.main(
            [
                "search",
                "char-lstm",
                "--table-only",
                "--out",
                str(tmp_path),
                "--runs",
                str(tmp_path / "none"),
            ]
        )
        == 0
    )
    assert "not run" in (tmp_path / "search-char-lstm.md").read_text()
    capsys.readouterr()
    tuned = ["table1", "char-lstm", "--tuned", "--out", str(tmp_path)]
    assert cli.main([*tuned, "--search-runs", str(tmp_path / "none")]) == 2  # before training
    assert "search of char-lstm" in capsys.readouterr().err
    assert not (tmp_path / "table1").exists()
    assert cli.main(["table1", "resnet"]) == 2  # argparse's own error, no traceback
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in (*cli.EXPERIMENTS, *presets.PRESETS))


def test_python_dash_m_figures_runs_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import runpy

    monkeypatch.setattr("sys.argv", ["python -m figures", "list"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("figures", run_name="__main__")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(
        "figures: fig1, fig2, fig3a, fig3b, fig3c, fisher-compare"
    )


def test_paper_preset_has_the_paper_sizes() -> None:
    sizes = {name: spectrum_figure.plan(name, "paper") for name in ("fig1", "fig3a", "fig3b")}
    assert {k: v["n_params"] for k, v in sizes.items()} == {
        "fig1": 47658,
        "fig3a": 50890,
        "fig3b": 32640,
    }
    assert {k: v["runs"] for k, v in sizes.items()} == {"fig1": 2, "fig3a": 2, "fig3b": 5}


def test_cli_missing_data_names_make_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HS_MNIST_DIR", str(tmp_path))
    assert cli.main(["fig1", "--out", str(tmp_path / "out")]) == 1
    assert "make data" in capsys.readouterr().err


def test_loop_accepts_optimizers_whose_step_returns_none() -> None:
    class QuietSGD(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            super().step(closure)
            return None

    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    losses = _loop(model, QuietSGD(model.parameters(), lr=0.5), 3)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_token_stream_refuses_text_too_short_for_the_batch() -> None:
    from figures.loop import TokenStream

    with pytest.raises(ValueError, match="smaller batch_size"):
        TokenStream(torch.arange(30), batch_size=20, bptt=5)


def test_sample_rank_bound_is_the_rank_of_a_real_gauss_newton_matrix():
    from figures.stats import sample_rank_bound

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)
    ).double()  # n = 84 parameters, 4 classes
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    G = spectra.ggn_operator(model, torch.nn.CrossEntropyLoss(), (X, y))
    dense = G @ torch.eye(G.shape[0], dtype=torch.float64)
    bound = sample_rank_bound(G.shape[0], len(y), 4)
    assert bound["ggn_rank_bound"] == 6 * 3 == torch.linalg.matrix_rank(dense).item()
    eig = torch.linalg.eigvalsh(dense)
    zero = (eig.abs() <= 1e-12 * eig.abs().max()).double().mean().item()
    assert zero == pytest.approx(bound["fraction_forced_zero_by_samples"]) == 1 - 18 / 84
    assert sample_rank_bound(84, 100, 4)["fraction_forced_zero_by_samples"] == 0.0


def test_sample_count_sweep_reports_the_bound_for_each_count(tmp_path):
    from figures import fig1_samples

    table_path = tmp_path / "t.md"
    args = ["16", "40", "--preset", "smoke", "--out", str(tmp_path), "--table", str(table_path)]
    fig1_samples.main(args)
    text = table_path.read_text()
    n = 647  # the smoke preset's small-LeNet
    for count in (16, 40):
        forced = 100 * max(0.0, 1 - count * 9 / n)
        assert f"| {count} | {min(n, count * 9):,} | {forced:.1f}% |" in text
    runs = presets.get("smoke", "fig1").runs
    first = [float(x.strip().rstrip("%")) for x in text.splitlines()[-1].split("|")[4].split("/")]
    assert len(first) == runs
    fig1_samples.main([*args[1:], "--runs", "1"])  # 40 samples, the first run: same weights
    one = table_path.read_text().splitlines()[-1].split("|")[4].strip()
    assert len(one.split(" / ")) == 1 and float(one.rstrip("%")) == first[0]
    with pytest.raises(ValueError, match="runs must be in"):
        fig1_samples.sweep([16], "smoke", str(tmp_path), runs=runs + 1)


def test_checkpoint_of_a_spectrum_outlives_edits_to_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached spectrum is keyed by the library's source, its row checkpoint by the
    problem alone: after an edit to spectra/ the spectrum is recomputed from the
    checkpoint (re-checked against the current code), not rebuilt from row 0."""
    cfg = replace(presets.get("smoke", "fig3a"), checkpoint=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(20, 12, generator=g), torch.randint(0, 3, (20,), generator=g))]
    cache = Cache(tmp_path)
    built = []
    monkeypatch.setattr(spectrum_figure, "code_version", lambda sources: "library v1")
    first, hit = spectrum_figure.spectrum_or_load(
        model, cfg, batches, {"w": 1}, cache, "run", progress=False
    )
    assert not hit and not first.info["eigenvalues_from_checkpoint"]
    built.append(sorted(p.name for p in (tmp_path / "checkpoints").iterdir()))
    monkeypatch.setattr(spectrum_figure, "code_version", lambda sources: "library v2")
    second, hit = spectrum_figure.spectrum_or_load(
        model, cfg, batches, {"w": 1}, cache, "run", progress=False
    )
    assert not hit  # another library version: the spectrum is not taken from the cache
    assert second.info["eigenvalues_from_checkpoint"]  # but the checkpoint is reused
    built.append(sorted(p.name for p in (tmp_path / "checkpoints").iterdir()))
    assert built[0] == built[1] and len(built[0]) == 1
    np.testing.assert_array_equal(second.eigenvalues, first.eigenvalues)
