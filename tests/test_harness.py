"""The training harness: BatchNorm recompute, effective epochs, bit-identical resume,
config checks, and smoke runs of every recipe and optimizer on tiny synthetic data."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from figures.harness import ConfigMismatchError, RunConfig, run_dir, train
from figures.loop import recompute_batchnorm
from figures.optimizers import OPTIMIZERS
from figures.recipes import RECIPES, recipe

TINY_IMAGES = {"n": 192, "shape": [1, 28, 28], "val_size": 32, "test_size": 32}
TINY_KW = {
    "sgd": {"lr": 0.05},
    "adam": {"lr": 1e-3},
    "entropy-sgd": {"lr": 0.5, "L": 3, "gamma": 0.03},
    "entropy-adam": {"lr": 1e-3, "L": 3},
    "sgld": {"lr": 0.01},
    "sam": {"lr": 0.05, "rho": 0.05},
}


def tiny(optimizer: str = "adam", **overrides) -> RunConfig:
    """mnistfc with BatchNorm and dropout at hidden 16 on 128 synthetic training images."""
    base = dict(
        name=f"tiny-{optimizer}",
        model="mnistfc",
        model_kwargs={"hidden": 16},
        data="synthetic-images",
        data_kwargs=dict(TINY_IMAGES),
        optimizer=optimizer,
        optimizer_kwargs=dict(TINY_KW[optimizer]),
        epochs=1,
        batch_size=32,
    )
    return RunConfig(**{**base, **overrides})


# -- BatchNorm ---------------------------------------------------------------------------


def test_recompute_batchnorm_gives_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(64, 3) * 3 + 1
    model.train()
    for _ in range(5):  # pollute the running statistics
        model(torch.randn(64, 3) * 10 - 5)
    model.eval()
    assert recompute_batchnorm(model, [x], num_batches=1) == 1
    z = model[0](x).detach()
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, z.mean(0))
    torch.testing.assert_close(bn.running_var, z.var(0, unbiased=True))
    assert not model.training and bn.momentum == 0.1
    # equal batches: the running mean is the mean over all of them
    recompute_batchnorm(model, list(x.split(16)), num_batches=None)
    torch.testing.assert_close(bn.running_mean, z.mean(0))
    # num_batches caps the passes; a model without BatchNorm is untouched
    assert recompute_batchnorm(model, list(x.split(16)), num_batches=2) == 2
    assert recompute_batchnorm(nn.Linear(3, 1), [x]) == 0


# -- Effective epochs and logs -------------------------------------------------------------


@pytest.mark.parametrize("optimizer, L", [("adam", 1), ("sam", 2), ("entropy-sgd", 3)])
def test_effective_epochs_count_gradient_evaluations(tmp_path, optimizer, L):
    cfg = tiny(optimizer, epochs=1)
    res = train(cfg, tmp_path, progress=False)
    per_pass = (192 - 64) // 32
    last = res.final
    assert last["L"] == L and last["steps"] == per_pass
    assert last["grad_evals"] == L * per_pass and last["effective_epoch"] == L
    # one evaluation per effective epoch
    assert len(res.log) == L
    assert [math.floor(r["effective_epoch"]) for r in res.log] == list(range(1, L + 1))
    d = run_dir(cfg, tmp_path)
    assert d.name.startswith("tiny-" + optimizer + "-")
    assert json.loads((d / "log.json").read_text())["log"] == res.log
    header = (d / "log.csv").read_text().splitlines()[0].split(",")
    for key in ("effective_epoch", "train_loss", "train_error", "val_error", "test_error"):
        assert key in header
    assert (d / "checkpoint.pt").exists() and not list(d.glob("*.tmp*"))


# -- Resume ------------------------------------------------------------------------------------


def _strip(log):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in log]


@pytest.mark.parametrize("optimizer", ["adam", "entropy-sgd"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    cfg = tiny(optimizer, epochs=3, milestones=[1, 2], lr_factor=0.5)
    if optimizer == "entropy-sgd":  # L=2: 6 evaluations over 2 outer epochs
        cfg = cfg.replace(
            epochs=2, milestones=[1], optimizer_kwargs={**cfg.optimizer_kwargs, "L": 2}
        )
    straight = train(cfg, tmp_path / "a", progress=False)
    first = train(cfg, tmp_path / "b", progress=False, stop_after=2)
    assert len(first.log) == 2 < len(straight.log)
    torch.manual_seed(12345)  # the global RNG must come from the checkpoint, not from here
    resumed = train(cfg, tmp_path / "b", progress=False)
    assert _strip(resumed.log) == _strip(straight.log)
    for (k, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k


def test_max_effective_epochs_stops_resumably_and_table_compares_at_equal_cost(tmp_path):
    from figures import table1

    base = tiny("adam", epochs=4)
    ent = tiny("entropy-sgd", epochs=1, optimizer_kwargs={**TINY_KW["entropy-sgd"], "L": 2})
    capped = train(base, tmp_path, progress=False, max_effective_epochs=2)
    assert [row["effective_epoch"] for row in capped.log] == [1.0, 2.0]
    again = train(base, tmp_path, progress=False, max_effective_epochs=2)  # nothing to do
    assert len(again.log) == 2
    train(ent, tmp_path, progress=False)
    text = table1.table("mnistfc", [base, ent], tmp_path / "t.md", tmp_path)
    ent_log = json.loads((run_dir(ent, tmp_path) / "log.json").read_text())["log"]
    assert ent_log[-1]["effective_epoch"] == 2.0
    expected = (
        f"At equal cost (2.0 vs 2.0 effective epochs): adam "
        f"{100 * capped.log[-1]['test_error']:.3f}, entropy-sgd "
        f"{100 * ent_log[-1]['test_error']:.3f}."
    )
    assert expected in text
    finished = train(base, tmp_path, progress=False)  # lifting the cap goes on to the end
    assert [row["effective_epoch"] for row in finished.log] == [1.0, 2.0, 3.0, 4.0]


def test_log_reports_the_scoped_gamma_not_gamma0(tmp_path):
    kw = {
        **TINY_KW["entropy-sgd"],
        "L": 2,
        "gamma": 1e-3,
        "scoping": "exponential",
        "scoping_rate": 0.1,
    }
    result = train(tiny("entropy-sgd", epochs=2, optimizer_kwargs=kw), tmp_path, progress=False)
    for row in result.log:  # the last step used t = steps - 1
        assert row["gamma"] == pytest.approx(1e-3 * 1.1 ** (row["steps"] - 1), rel=1e-12)
    assert result.log[-1]["gamma"] > 1.5e-3


def test_checkpoint_for_another_config_is_refused(tmp_path):
    a, b = tiny("adam"), tiny("adam", seed=1)
    train(a, tmp_path, progress=False, stop_after=1)
    run_dir(b, tmp_path).mkdir(parents=True)
    shutil.copy(run_dir(a, tmp_path) / "checkpoint.pt", run_dir(b, tmp_path) / "checkpoint.pt")
    with pytest.raises(ConfigMismatchError, match="resume=False"):
        train(b, tmp_path, progress=False)
    train(b, tmp_path, progress=False, resume=False)  # starting over is allowed


def test_config_errors():
    with pytest.raises(ValueError, match="optimizer"):
        tiny().replace(optimizer="lbfgs")
    with pytest.raises(ValueError, match="epochs"):
        tiny(epochs=0)
    with pytest.raises(KeyError, match="choose from"):
        recipe("resnet", "sgd")


# -- Smoke runs ------------------------------------------------------------------------------


SMOKE_SETUPS = {
    "lenet-bn": dict(
        model_kwargs={"width": 0.2}, data="synthetic-images", data_kwargs={**TINY_IMAGES, "n": 128}
    ),
    "all-cnn-bn": dict(
        model_kwargs={"width": 0.05},
        data="synthetic-images",
        data_kwargs={**TINY_IMAGES, "n": 112, "shape": [3, 32, 32]},
    ),
    "ptb-lstm": dict(
        model_kwargs={"hidden": 16},
        data="synthetic-tokens",
        data_kwargs={"n": 1500, "vocab": 30, "bptt": 10},
        batch_size=8,
    ),
}


@pytest.mark.parametrize("model", SMOKE_SETUPS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_the_paper_models(tmp_path, model, optimizer):
    """LeNet-BN, All-CNN-BN (reduced width) and PTB-LSTM (reduced width and vocabulary,
    synthetic tokens) through the harness with every optimizer: finite losses, logs and
    a checkpoint."""
    cfg = tiny(optimizer, model=model, epochs=1, bn_batches=2, **SMOKE_SETUPS[model])
    res = train(cfg, tmp_path, progress=False)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in res.log)
    for name in ("checkpoint.pt", "log.json", "log.csv", "config.json"):
        assert (res.directory / name).exists()


SMOKE_DATA = {
    "mnist": ("synthetic-images", TINY_IMAGES),
    "cifar10": ("synthetic-images", {**TINY_IMAGES, "n": 128, "shape": [3, 32, 32]}),
    "austen": ("synthetic-tokens", {"n": 2000, "vocab": 30, "bptt": 10}),
    "ptb": ("synthetic-tokens", {"n": 2000, "vocab": 30, "bptt": 10}),
}
SMOKE_MODEL = {
    "mnistfc": {"hidden": 16},
    "lenet-bn": {"width": 0.2},
    "all-cnn-bn": {"width": 0.05},
    "char-lstm": {"hidden": 16},
    "ptb-lstm": {"hidden": 16},
}


@pytest.mark.parametrize(
    "experiment, optimizer", [(e, o) for e, pair in RECIPES.items() for o in pair]
)
def test_paper_recipes_run_at_reduced_size(tmp_path, experiment, optimizer):
    """Every recipe's optimizer settings and schedule, at tiny width on synthetic data."""
    cfg = recipe(experiment, optimizer)
    data, data_kw = SMOKE_DATA[cfg.data]
    kw = dict(cfg.optimizer_kwargs)
    if "L" in kw:
        kw["L"] = 2
    small = cfg.replace(
        data=data,
        data_kwargs=data_kw,
        epochs=2,
        batch_size=16,
        model_kwargs={**cfg.model_kwargs, **SMOKE_MODEL[cfg.model]},
        optimizer_kwargs=kw,
        milestones=[1],
        bn_batches=4,
    )
    res = train(small, tmp_path, progress=False)
    first, last = res.log[0], res.log[-1]
    assert all(math.isfinite(r["train_loss"]) for r in res.log)
    assert last["epoch"] == 2
    if data == "synthetic-tokens":
        assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]))
        assert last["val_perplexity"] < 30  # better than uniform over the vocabulary
    assert last["val_loss"] < first["val_loss"] + 0.5


# -- Table 1 script --------------------------------------------------------------------------


def test_table1_modes_and_partial_table(tmp_path):
    from figures import table1

    full = table1.configs("mnistfc")
    assert [c.epochs for c in full] == [100, 5]
    assert full[0].milestones == [30, 60, 90] and full[1].optimizer_kwargs["L"] == 20
    quick = table1.configs("mnistfc", "quick")
    assert all(c.epochs == 1 and c.data_kwargs["train_size"] == 5000 for c in quick)
    reduced = table1.configs("char-lstm", "reduced")
    assert [c.epochs for c in reduced] == [5, 1]
    assert all(c.data_kwargs["chars"] == 500_000 for c in reduced)
    cfg = tiny("adam", name=quick[0].name, epochs=2)
    train(cfg, tmp_path / "runs", progress=False, stop_after=1)
    text = table1.table("mnistfc", [cfg, quick[1]], tmp_path / "t.md", tmp_path / "runs")
    assert "partial: 1.00/2 epochs" in text and "not run" in text and "1.39 +/- 0.03" in text
    assert (tmp_path / "t.md").read_text() == text
    from figures import cli

    assert cli.main(["curves", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 0
    assert sorted(tmp_path.glob("fig*.png")) == [tmp_path / "fig4a-mnistfc.png"]


def test_evaluation_sees_batchnorm_statistics_of_x_not_of_the_sgld_iterates(tmp_path):
    cfg = tiny("entropy-sgd", model_kwargs={"hidden": 16, "dropout": 0.0}, bn_batches=3)
    res = train(cfg, tmp_path, progress=False)
    bn = next(m for m in res.model.modules() if isinstance(m, nn.BatchNorm1d))
    logged = bn.running_mean.clone(), bn.running_var.clone()
    recompute_batchnorm(res.model, res.task.bn_batches(3), 3)
    torch.testing.assert_close((bn.running_mean, bn.running_var), logged)
    assert int(bn.num_batches_tracked) == 3


def test_curves_pick_the_full_run_and_its_variants(tmp_path):
    import os

    from figures.curves import pick_runs

    def run(directory: str, value: float, age: int, seed: int = 0) -> None:
        (tmp_path / directory).mkdir()
        path = tmp_path / directory / "log.json"
        path.write_text(json.dumps({"config": {"seed": seed}, "log": [{"val_error": value}]}))
        os.utime(tmp_path / directory, (1e9 + age, 1e9 + age))

    run("x-adam-quick-00000000", 0.5, 1)
    run("x-adam-reduced-11111111", 0.4, 2)
    assert list(pick_runs(tmp_path, "x-adam")) == ["x-adam-reduced"]  # newest shortened run
    run("x-adam-22222222", 0.3, 3)
    run("x-adam-lr1e-2-33333333", 0.2, 4)
    picked = pick_runs(tmp_path, "x-adam")
    assert picked == {"x-adam": [{"val_error": 0.3}], "x-adam-lr1e-2": [{"val_error": 0.2}]}
    run("x-adam-44444444", 0.1, 5, seed=1)  # another seed is another line
    run("x-adam-lr1e-2-quick-55555555", 0.6, 6)  # a full run of that variant exists
    run("x-adam-wd-quick-66666666", 0.7, 7)  # a variant with only a shortened run
    assert list(pick_runs(tmp_path, "x-adam")) == [
        "x-adam",
        "x-adam-lr1e-2",
        "x-adam seed 1",
        "x-adam-wd-quick",
    ]


def test_table1_over_seeds_reports_mean_and_standard_deviation(tmp_path):
    import statistics

    from figures import table1

    base = tiny("adam", epochs=2)
    ent = tiny("entropy-sgd", epochs=1, optimizer_kwargs={**TINY_KW["entropy-sgd"], "L": 2})
    errors = [
        100 * train(base.replace(seed=s), tmp_path, progress=False).final["test_error"]
        for s in (0, 1)
    ]
    train(ent, tmp_path, progress=False)  # seed 0 only
    text = table1.table("mnistfc", [base, ent], tmp_path / "t.md", tmp_path, seeds=(0, 1))
    adam_row = next(line for line in text.splitlines() if line.startswith("| adam"))
    assert (
        f"{statistics.mean(errors):.3f} +/- {statistics.stdev(errors):.3f} (2 runs; "
        f"seed 0: {errors[0]:.3f}, seed 1: {errors[1]:.3f})"
    ) in adam_row
    ent_row = next(line for line in text.splitlines() if line.startswith("| entropy-sgd"))
    assert "seed 0:" in ent_row and "+/-" not in ent_row.split("|")[2]
    assert "At equal cost (seed 0, " in text and "At equal cost (seed 1, " not in text
    stopped = base.replace(epochs=1, name="short")
    train(stopped, tmp_path, progress=False)
    short = table1.table("mnistfc", [stopped, ent], tmp_path / "s.md", tmp_path)
    assert "| adam | " in short and "not run" not in short
    assert "At equal cost" not in short  # a baseline that stopped short is not compared


# -- Run directories keep their names --------------------------------------------------------


def test_digests_of_recorded_runs_are_unchanged():
    """The run directory of a config is named by its digest: these are the digests the
    recorded runs (runs/table1, runs/search) and the README's commands were made with."""
    from figures import search, table1

    paper = {c.name: c.digest() for c in table1.configs("mnistfc") + table1.configs("char-lstm")}
    assert paper == {
        "mnistfc-adam": "eb5f6fbd",
        "mnistfc-entropy-sgd": "2e8ed91b",
        "char-lstm-adam": "62c75298",
        "char-lstm-entropy-adam": "2a8d3e8e",
    }
    authors = table1.configs("mnistfc", conventions="authors")[1]
    assert (authors.digest(), authors.replace(seed=1).digest()) == ("11c7ec25", "36bf84a6")
    assert table1.configs("char-lstm", conventions="authors")[1].digest() == "06367bb8"
    full = recipe("mnistfc", "entropy-sgd")
    trial = search.compress(full, search.apply(full, {("model", "dropout"): 0.15}), 0.2)
    assert trial.digest() == "f0da2481"
    assert "noise_seed" not in full.to_dict()  # a new field at its default is not hashed
    assert full.replace(noise_seed=0).digest() != full.digest()


def test_bn_batches_zero_leaves_batchnorm_as_training_made_it(tmp_path):
    cfg = tiny("adam", model_kwargs={"hidden": 16, "dropout": 0.0}, bn_batches=0)
    res = train(cfg, tmp_path, progress=False)
    bn = next(m for m in res.model.modules() if isinstance(m, nn.BatchNorm1d))
    assert int(bn.num_batches_tracked) == res.final["steps"]  # only training's updates
    with pytest.raises(ValueError, match="bn_batches"):
        tiny(bn_batches=-1)


def test_at_end_sees_the_trained_run_also_when_it_is_only_loaded(tmp_path):
    seen = []

    def at_end(result):
        seen.append((result.final["steps"], type(result.optimizer).__name__))
        return {"norm": float(sum(p.detach().norm() for p in result.model.parameters()))}

    cfg = tiny("adam", epochs=2)
    first = train(cfg, tmp_path, progress=False, stop_after=1, at_end=at_end)
    assert first.extras == {} and seen == []  # stopped early: not finished yet
    done = train(cfg, tmp_path, progress=False, at_end=at_end)
    loaded = train(cfg, tmp_path, progress=False, at_end=at_end)  # complete: nothing to train
    assert seen == [(8, "Adam"), (8, "Adam")] and loaded.extras == done.extras
    assert loaded.log == done.log


def test_sparse_checkpoints_still_resume_bit_identically(tmp_path):
    cfg = tiny("adam", epochs=3, milestones=[1, 2], lr_factor=0.5)
    straight = train(cfg, tmp_path / "a", progress=False)
    first = train(cfg, tmp_path / "b", progress=False, stop_after=2, checkpoint_seconds=1e9)
    saved = json.loads((run_dir(cfg, tmp_path / "b") / "log.json").read_text())["log"]
    assert len(saved) == len(first.log) == 2  # a stop writes, whatever the interval
    resumed = train(cfg, tmp_path / "b", progress=False, checkpoint_seconds=1e9)
    assert _strip(resumed.log) == _strip(straight.log)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
        )
    )
