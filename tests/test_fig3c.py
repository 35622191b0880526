"""Fig 3c (Fisher diagonal from Adam's moments) and the fisher-compare figure on the
synthetic 'smoke' preset: outputs, statistics keys, the data set named, cache reuse,
the CIFAR-10 -> Fashion-MNIST fallback and the paper preset's plan."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SPECTRUM_KEYS

from figures import catalog, cli, fig3c, fig_fisher_compare, presets, tasks
from figures.datasets import MissingDataError
from figures.figure_runs import figure_task
from figures.request import FigureRequest

FIGS = ("fig3c", "fisher-compare")
RUN_KEYS = SPECTRUM_KEYS | {"fraction_near_zero_at", "adam_steps"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("fig3c")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield (
            out,
            {name: catalog.run(name, FigureRequest("smoke", out, progress=False)) for name in FIGS},
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", FIGS)
def test_writes_png_pdf_json_with_keys(smoke: tuple[Path, dict], name: str) -> None:
    out, _ = smoke
    for ext in ("png", "pdf", "json"):
        assert (out / f"{name}.{ext}").stat().st_size > 0
    stats = json.loads((out / f"{name}.json").read_text())
    assert stats["preset"] == "smoke" and stats["figure"] == name
    assert stats["dataset"] == "synthetic images (tests)"
    assert stats["dataset"] in stats["caption"]
    assert stats["near_zero_tol"] == 1e-5 == presets.get("smoke", name).paper["near_zero_tol"]
    assert len(stats["runs"]) == stats["n_runs"] == presets.get("smoke", name).runs
    for run in stats["runs"]:
        assert RUN_KEYS <= run.keys()
        assert run["bottom"] <= run["top"] and run["n_params"] == stats["n_params"]
        assert 0.0 <= run["test_error"] <= 1.0


def test_fig3c_stats(smoke: tuple[Path, dict]) -> None:
    stats = smoke[1]["fig3c"]
    assert stats["unbiased"] is False and "minibatch" in stats["estimator"]
    assert set(stats["fraction_near_zero_at"]) >= {"1e-05", "1e-06", "0.0001"}
    assert stats["paper"]["fraction_near_zero"] == 0.95 and stats["paper"]["test_error"] == 0.112
    assert stats["test_error_per_run"] == [r["test_error"] for r in stats["runs"]]
    assert {"n_negative", "fraction_near_zero", "top", "bottom"} <= stats["mean"].keys()
    assert "unbiased=False" in stats["caption"] and "Adam steps" in stats["horizon_note"]


def test_compare_stats(smoke: tuple[Path, dict]) -> None:
    stats = smoke[1]["fisher-compare"]
    corr = stats["correlations"]
    for pair in (
        "adam_x_B vs empirical_fisher",
        "empirical_fisher vs hessian",
        "adam_x_B vs hessian",
    ):
        assert {"pearson", "spearman"} <= corr[pair].keys()
        assert -1.0 <= corr[pair]["spearman"] <= 1.0
    assert set(stats["diagonals"]) == {
        "adam_x_B",
        "empirical_fisher",
        "empirical_fisher_centered",
        "hessian",
    }
    assert all(d["n_params"] == stats["n_params"] for d in stats["diagonals"].values())


def test_rerun_reads_the_cache(smoke: tuple[Path, dict]) -> None:
    out, first = smoke
    again = fig3c.run(FigureRequest("smoke", out, progress=False))
    assert all(r["weights_cached"] for r in again["runs"])
    assert again["mean"] == first["fig3c"]["mean"]
    cmp_again = fig_fisher_compare.run(FigureRequest("smoke", out, progress=False))
    run = cmp_again["runs"][0]
    assert run["weights_cached"] and run["diagonals_cached"]
    assert cmp_again["correlations"] == first["fisher-compare"]["correlations"]


def test_correlations_of_known_vectors() -> None:
    a = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    c = fig_fisher_compare.correlations(a, 2 * a)
    assert c["pearson"] == pytest.approx(1.0) and c["spearman"] == pytest.approx(1.0)
    assert c["n_nonzero_both"] == 4 and c["pearson_log_abs"] == pytest.approx(1.0)


def test_cifar_missing_falls_back_to_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*_a: object, **_k: object) -> None:
        raise MissingDataError("no CIFAR-10")

    def fake_fashion(root: object = None, split: str = "train") -> tuple:
        n = 20 if split == "train" else 10
        return torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))

    monkeypatch.setattr(tasks.D, "load_cifar10", missing)
    monkeypatch.setattr(tasks.D, "load_fashion_mnist", fake_fashion)
    cfg = replace(
        presets.get("default", "fig3c"),
        data=presets.DataConfig("cifar10", n_train=8, n_test=4, n_hessian=0),
    )
    task = figure_task("fig3c", cfg, channels=3, fallback="fashion-mnist")
    assert task.info["dataset"] == fig3c.CIFAR_MISSING and "HS_CIFAR10_DIR" in fig3c.CIFAR_MISSING
    (x, _), (xt, _) = task.splits["train"], task.splits["test"]
    assert x.shape == (8, 3, 28, 28) and xt.shape == (4, 3, 28, 28) and "val" not in task.splits
    assert torch.equal(x[:, 0], x[:, 2])


def test_dry_run_paper_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fig3c", "--preset", "paper", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["n_params"] == 1_372_254 and plan["runs"] == 4 and plan["n_train"] == "all"
    assert cli.main(["fisher-compare", "--preset", "default", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["hessian_vector_products"] == plan["n_params"] == 6370
