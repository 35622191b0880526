"""Data sharded over 2 gloo ranks gives the same operator as 1 process, and a refusal
that one rank's data triggers is raised on every rank (none is left waiting in a
collective the other has abandoned)."""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from wrong_backwards import FusedCrossEntropy, ScaledProduct

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


def _as_rank(rank: int, store: str, out: str, compute) -> None:
    """Join the 2-rank gloo group, write ``compute()``'s dict to ``out/rank<rank>.json``."""
    # a rank left in a collective alone fails after 60 s instead of hanging the test
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    finished = False
    try:
        result = compute()
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


def _shard(rank: int, inputs: torch.Tensor, targets: torch.Tensor):
    """Rank 0: one batch of 13 samples; rank 1: batches of 3 and 4."""
    if rank == 0:
        return inputs[:SPLIT], targets[:SPLIT]
    return [(inputs[SPLIT:16], targets[SPLIT:16]), (inputs[16:], targets[16:])]


def _worker(rank: int, store: str, out: str) -> None:
    def compute():
        model, loss, X, y = problem()
        H = spectra.hessian_operator(model, loss, _shard(rank, X, y), process_group=True)
        return {
            "eigenvalues": torch.linalg.eigvalsh(H.to_dense()).tolist(),
            "loss": H.loss,
            "num_samples": H.num_samples,
            "grad": H.gradient().tolist(),
        }

    _as_rank(rank, store, out, compute)


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


SMALL = 5  # rank 1's batches (3 and 4 samples) are below it, rank 0's (13) is not


def _fused_on_small_batches(logits, labels):
    """Plain cross-entropy on rank 0's batch, the fused one on rank 1's."""
    if len(labels) < SMALL:
        return FusedCrossEntropy.apply(logits, labels)
    return torch.nn.functional.cross_entropy(logits, labels)


class _WrongOnSmallBatches(nn.Module):
    """A bilinear regressor whose backward is wrong only on rank 1's batches."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.l1(x), self.l2(x)
        product = ScaledProduct.apply(a, b) if len(x) < SMALL else a * b
        return product.sum(-1, keepdim=True)


def _refusing_worker(rank: int, store: str, out: str) -> None:
    def compute():
        model, _, X, y = problem()
        torch.manual_seed(0)
        bilinear = _WrongOnSmallBatches().double()
        Y = torch.randn(20, 1, dtype=F64)
        cases = {
            "graphless loss": (model, _fused_on_small_batches, y),
            "asymmetric product": (bilinear, nn.MSELoss(), Y),
        }
        result = {}
        for name, (net, loss, targets) in cases.items():
            H = spectra.hessian_operator(
                net,
                loss,
                _shard(rank, X, targets),
                process_group=True,
                backend="autograd",
                reduction="mean",
                loss_terms=lambda outputs, targets: len(targets),  # a plain mean needs it here
            )
            try:
                H @ torch.ones(H.shape[0], dtype=F64)
                result[name] = None
            except RuntimeError as exc:
                result[name] = str(exc)
        return result

    _as_rank(rank, store, out, compute)


def test_a_refusal_one_rank_triggers_is_raised_on_every_rank(tmp_path):
    """Rank 1's batches go through a fused loss / a wrong backward, rank 0's do not: the
    verdicts are reduced over ranks, so both refuse (and neither waits for the other)."""
    mp.spawn(_refusing_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    for got in ranks:
        assert got["graphless loss"] is not None and "finite_difference" in got["graphless loss"]
        assert got["asymmetric product"] is not None
        assert "not symmetric" in got["asymmetric product"]
    assert "another rank's data" in ranks[0]["graphless loss"]
    assert "another rank's data" not in ranks[1]["graphless loss"]
    assert "on another rank's first batch" in ranks[0]["asymmetric product"]
    assert "on batch 0" in ranks[1]["asymmetric product"]


def _scan_refusing_worker(rank: int, store: str, out: str) -> None:
    def compute():
        model, loss, X, y = problem()
        result = {}

        def token_mean(logits, labels):  # a plain mean: weighted by samples across ranks
            return nn.functional.cross_entropy(logits, labels)

        bad = X.clone()
        if rank == 1:
            bad[SPLIT:] = float("nan")  # only rank 1's data gives a NaN loss
        cases = {
            "plain mean": (token_mean, X),
            "NaN on rank 1": (loss, bad),
        }
        for name, (loss_fn, inputs) in cases.items():
            try:
                spectra.hessian_operator(
                    model, loss_fn, _shard(rank, inputs, y), process_group=True
                )
                result[name] = None
            except (ValueError, RuntimeError) as exc:
                result[name] = f"{type(exc).__name__}: {exc}"
        return result

    _as_rank(rank, store, out, compute)


def test_a_refusal_while_reading_the_data_is_raised_on_every_rank(tmp_path):
    """A plain function's mean cannot be checked against other ranks' batches (a probe:
    sequences of other lengths, or class weights, on another rank were weighted by
    samples, 27% and 71% off, silently), so it is refused on every rank, naming
    loss_terms=; and a refusal of one rank's data (here a NaN loss) reaches the other,
    which used to wait in the next collective until the process group's timeout."""
    mp.spawn(
        _scan_refusing_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True
    )
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    for got in ranks:
        assert "loss_terms=" in got["plain mean"] and "across ranks" in got["plain mean"]
    assert "ValueError" in ranks[1]["NaN on rank 1"] and "nan" in ranks[1]["NaN on rank 1"]
    assert ranks[0]["NaN on rank 1"].startswith("RuntimeError: rank 1 refused its data")
