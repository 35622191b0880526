"""Data sharded over 2 gloo ranks gives the same operator as 1 process."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import spectra

F64 = torch.float64
SPLIT = 13  # rank 0 holds 13 samples, rank 1 holds 7: unequal shards


def problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    X = torch.randn(20, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (20,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    finished = False
    try:
        model, loss, X, y = problem()
        shard = (
            (X[:SPLIT], y[:SPLIT]) if rank == 0 else [(X[SPLIT:16], y[SPLIT:16]), (X[16:], y[16:])]
        )
        H = spectra.hessian_operator(model, loss, shard, process_group=True)
        dense = H.to_dense()
        result = {
            "eigenvalues": torch.linalg.eigvalsh(dense).tolist(),
            "loss": H.loss,
            "num_samples": H.num_samples,
            "grad": H.gradient().tolist(),
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
        finished = True
    finally:
        # both ranks leave together: tearing gloo down while the peer still talks to it
        # aborts the process now and then ("terminate called without an active exception",
        # seen even after this barrier on a loaded machine), so a rank that has written
        # its result leaves without the teardown; a failed one raises as usual
        dist.barrier()
        if finished:
            os._exit(0)
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    model, loss, X, y = problem()
    H = spectra.hessian_operator(model, loss, (X, y))
    expected = torch.linalg.eigvalsh(H.to_dense()).numpy()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["num_samples"] == 20
        np.testing.assert_allclose(
            got["eigenvalues"], expected, rtol=0, atol=1e-10 * np.abs(expected).max()
        )
        assert abs(got["loss"] - H.loss) < 1e-12
        np.testing.assert_allclose(got["grad"], H.gradient().numpy(), rtol=0, atol=1e-12)


def test_process_group_without_init_is_a_clear_error():
    model, loss, X, y = problem()
    try:
        spectra.hessian_operator(model, loss, (X, y), process_group=True)
    except RuntimeError as exc:
        assert "init_process_group" in str(exc)
    else:
        raise AssertionError("expected a RuntimeError")
