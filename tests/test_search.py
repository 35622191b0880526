"""The reduced-budget hyper-parameter search (figures/search.py, issue 17): the budget and
schedule compression, and the coordinate rule read back from run logs."""

from __future__ import annotations

import json

import pytest

from figures.harness import run_dir
from figures.recipes import RECIPES
from figures.search import SPACES, apply, compress, grid_edges, search, tuned_config


def test_compress_keeps_the_effective_budget_and_the_final_gamma():
    full = RECIPES["mnistfc"]["entropy-sgd"]()  # 5 epochs x L=20, LR / 10 after epoch 2
    for L, epochs, milestones in ((20, 1, []), (10, 2, [1]), (5, 4, [2])):
        assert compress(full, apply(full, {("optimizer", "L"): L}), 0.2).epochs == epochs
        cfg = compress(full, apply(full, {("optimizer", "L"): L}), 0.2)
        assert cfg.epochs * L == 20 and cfg.milestones == milestones
        # gamma0 (1 + rate)^(steps) ends where the variant's full-length run would
        steps_full, steps = 5 * 20 // L, cfg.epochs
        rate = cfg.optimizer_kwargs["scoping_rate"]
        assert (1 + rate) ** steps == pytest.approx(1.001**steps_full, rel=1e-12)
    adam = RECIPES["mnistfc"]["adam"]()
    assert compress(adam, adam, 0.2).milestones == [6, 12, 18]
    assert compress(adam, adam, 0.2).name.endswith("-search")


def test_compress_refuses_a_budget_that_is_not_whole_outer_epochs():
    full = RECIPES["char-lstm"]["entropy-adam"]()  # 5 x L=5 = 25 effective epochs
    with pytest.raises(ValueError, match="whole number"):
        compress(full, apply(full, {("optimizer", "L"): 10}), 0.2)
    with pytest.raises(ValueError, match="fraction"):
        compress(full, full, 0.0)


def _fake_log(path, val, test, epochs):
    path.mkdir(parents=True, exist_ok=True)
    row = {"epoch": epochs, "val_error": val, "test_error": test, "seconds": 60.0}
    (path / "log.json").write_text(json.dumps({"log": [row]}))


def test_coordinate_search_picks_the_best_mean_validation_and_moves_on(tmp_path, monkeypatch):
    space = SPACES["mnistfc"]["adam"]  # dropout first, then lr
    full = RECIPES["mnistfc"]["adam"]()
    dropout = {0.5: (0.020, 0.022), 0.15: (0.018, 0.019), 0.3: (0.019, 0.017)}  # mean: 0.3 wins
    for value, vals in dropout.items():
        cfg = compress(full, apply(full, {("model", "dropout"): value}), 0.2)
        for seed, val in zip((0, 1), vals, strict=True):
            _fake_log(run_dir(cfg.replace(seed=seed), tmp_path), val, 9.9, cfg.epochs)
    trials = search("mnistfc", "adam", tmp_path, seeds=(0, 1), run=False)
    assert [t.settings[("model", "dropout")] for t in trials[:3]] == list(space[0].values)
    assert trials[2].val == pytest.approx(0.018)
    # the lr factor is tried at the winning dropout (the incumbent lr reuses its runs); the
    # untried values are listed without logs and a read-only search stops there
    assert [t.settings for t in trials[3:]] == [
        {("model", "dropout"): 0.3, ("optimizer", "lr"): lr} for lr in space[1].values[1:]
    ]
    assert all(t.logs == {} for t in trials[3:])


def _finish_search(runs, experiment, optimizer, val_of):
    """Fake finished logs for every trial of a search, ``val_of(settings)`` each."""
    full = RECIPES[experiment][optimizer]()
    while True:
        trials = search(experiment, optimizer, runs, seeds=(0, 1), run=False)
        missing = [t for t in trials if not t.logs]
        if not missing:
            return trials
        for t in missing:
            for seed in (0, 1):
                c = t.config.replace(seed=seed)
                _fake_log(run_dir(c, runs), val_of(t.settings), 9.9, c.epochs)
        assert full.name in trials[0].config.name


def test_tuned_config_is_the_full_recipe_with_the_winners_and_refuses_an_unfinished_search(
    tmp_path,
):
    full = RECIPES["mnistfc"]["entropy-sgd"]()  # 5 epochs x L=20, LR / 10 after epoch 2
    with pytest.raises(ValueError, match="not finished.*python -m figures search mnistfc"):
        tuned_config("mnistfc", "entropy-sgd", tmp_path)

    winners = {("model", "dropout"): 0.3, ("optimizer", "momentum"): 0.5}
    winners |= {("optimizer", "gamma"): 3e-4, ("optimizer", "L"): 5}

    def val(settings):  # each winning value lowers the validation error
        return 0.02 - 0.001 * sum(settings.get(key) == value for key, value in winners.items())

    trials = _finish_search(tmp_path, "mnistfc", "entropy-sgd", val)
    assert len(trials) == 4 + 1 + 2 + 2  # each factor's values less the incumbents
    cfg = tuned_config("mnistfc", "entropy-sgd", tmp_path)
    assert cfg.name == full.name + "-tuned"
    assert cfg.model_kwargs["dropout"] == 0.3
    kw = cfg.optimizer_kwargs
    assert (kw["momentum"], kw["gamma"], kw["L"]) == (0.5, 3e-4, 5)
    # L = 5 keeps the recipe's 100 effective epochs: 20 outer epochs, milestone 2 -> 8
    assert cfg.epochs * kw["L"] == full.epochs * full.optimizer_kwargs["L"] == 100
    assert cfg.milestones == [m * 4 for m in full.milestones]
    assert kw["scoping_rate"] == full.optimizer_kwargs["scoping_rate"]  # fraction 1


def test_an_incumbent_that_wins_a_later_factor_is_kept_and_the_search_moves_on(tmp_path):
    """The recipe's own gamma reuses the lr winner's runs (whose settings never named
    gamma); when it beats the other gammas the search must record it, not fail."""
    lr_best = {("optimizer", "lr"): 2e-2}

    def val(settings):  # lr 2e-2 is best; any gamma but the recipe's is worse
        worse_gamma = settings.get(("optimizer", "gamma"), 1e-2) != 1e-2
        return 1.5 - 0.1 * (settings.get(("optimizer", "lr")) == 2e-2) + 0.05 * worse_gamma

    trials = _finish_search(tmp_path, "char-lstm", "entropy-adam", val)
    gammas = [t.settings.get(("optimizer", "gamma")) for t in trials if t.factor.endswith("gamma")]
    assert gammas == list(SPACES["char-lstm"]["entropy-adam"][1].values[1:])
    cfg = tuned_config("char-lstm", "entropy-adam", tmp_path)
    full = RECIPES["char-lstm"]["entropy-adam"]()
    assert cfg.optimizer_kwargs["lr"] == lr_best[("optimizer", "lr")]
    assert cfg.optimizer_kwargs["gamma"] == full.optimizer_kwargs["gamma"] == 1e-2


def test_a_winner_at_the_edge_of_its_grid_is_flagged():
    lr, dropout = ("optimizer", "lr"), ("model", "dropout")
    assert grid_edges("mnistfc", "adam", {dropout: 0.3, lr: 1e-3}) == []  # both interior
    edges = grid_edges("mnistfc", "adam", {dropout: 0.15, lr: 2e-3})
    assert edges == [
        "dropout = 0.15 is the smallest of [0.15, 0.3, 0.5]",
        "lr = 0.002 is the largest of [0.0005, 0.001, 0.002]",
    ]
    # a factor the settings leave out is at the recipe's value (its first)
    assert grid_edges("mnistfc", "adam", {lr: 1e-3}) == [
        "dropout = 0.5 is the largest of [0.15, 0.3, 0.5]"
    ]
