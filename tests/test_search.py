"""The reduced-budget hyper-parameter search (figures/search.py, issue 17): the budget and
schedule compression, and the coordinate rule read back from run logs."""

from __future__ import annotations

import json

import pytest

from figures.harness import run_dir
from figures.recipes import RECIPES
from figures.search import SPACES, apply, compress, search


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
