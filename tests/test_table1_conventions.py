"""Table 1 under the authors' conventions (issue 17): the configs, not the runs."""

from __future__ import annotations

import pytest

from entropy_opt import AUTHORS_CODE, EntropySGD
from figures.optimizers import build_optimizer
from figures.table1 import configs


@pytest.mark.parametrize("experiment", ["mnistfc", "char-lstm"])
def test_authors_conventions_change_only_the_local_entropy_side(experiment):
    paper, authors = configs(experiment), configs(experiment, conventions="authors")
    for p, a in zip(paper, authors, strict=True):
        if not p.optimizer.startswith("entropy"):
            assert a == p  # the baseline run is shared
            continue
        assert a.name == p.name + "-authors"
        for key, value in AUTHORS_CODE.items():
            assert a.optimizer_kwargs[key] == value
        inner = ("sgld_momentum", "sgld_nesterov")
        rest = {k: v for k, v in a.optimizer_kwargs.items() if k not in AUTHORS_CODE}
        assert {k: v for k, v in rest.items() if k not in inner} == {
            k: v for k, v in p.optimizer_kwargs.items() if k not in inner
        }
        if a.optimizer == "entropy-sgd":  # the inner loop runs on the outer momentum
            assert rest["sgld_momentum"] == rest["momentum"]
            assert rest["sgld_nesterov"] == rest["nesterov"]
    with pytest.raises(ValueError, match="conventions"):
        configs(experiment, conventions="code")


def test_authors_mnistfc_optimizer_matches_entropy_sgd_authors_code():
    import torch

    cfg = configs("mnistfc", conventions="authors")[1]
    w = [torch.nn.Parameter(torch.zeros(3))]
    ours = build_optimizer(cfg.optimizer, w, cfg.optimizer_kwargs)
    base = {
        k: v
        for k, v in configs("mnistfc")[1].optimizer_kwargs.items()
        if k not in ("sgld_momentum", "sgld_nesterov")
    }
    theirs = EntropySGD.authors_code(w, **base)
    assert ours.param_groups[0] == theirs.param_groups[0]
