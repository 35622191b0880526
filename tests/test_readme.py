"""The README's Python examples, run as written, and their results checked against references.

Each block is taken from README.md by its first line.  A placeholder assignment
``name = ...`` stands for "your object": the test supplies ``name`` (and every other name
the block uses without defining it) and drops the placeholder line.  A block that starts
using a name the test does not supply fails with a NameError, so the examples cannot rot.
The quick start runs on a small trained tanh MLP (n = 339) whose dense float64 Hessian is
the reference; the Hugging Face block on a tiny GPT-2 built from a config (random weights).
"""

from __future__ import annotations

import ast
import copy
import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch
from conftest import reference_hessian
from torch import nn

import spectra
from benchmarks.training import trained_tanh_mlp

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = (10, 16, 8, 3)  # n = 339 parameters: above trace()'s 99 products, so it estimates


def readme_block(first_line: str) -> str:
    """The README's ```python block whose code starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README.md: {len(found)} python blocks start with {first_line!r}"
    return found[0]


def run_block(code: str, scope: dict[str, Any]) -> dict[str, Any]:
    """Execute ``code`` in ``scope`` without its ``name = ...`` placeholder lines.

    Every placeholder must be supplied in ``scope`` (else the block's meaning is unknown).
    The values of the block's top-level expression lines (what the README shows a reader,
    e.g. ``opt.diagnostics``) are kept, in order, in ``scope["shown"]``.  Returns ``scope``
    with the names the block defined.
    """
    tree = ast.parse(code)
    kept: list[ast.stmt] = []
    for node in tree.body:
        placeholder = (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and node.value.value is ...
        )
        if placeholder:
            assert node.targets[0].id in scope, f"the test must supply {node.targets[0].id!r}"
        elif isinstance(node, ast.Expr):
            show = ast.Call(ast.Name("_show_", ast.Load()), [node.value], [])
            kept.append(ast.copy_location(ast.Expr(show), node))
        else:
            kept.append(node)
    tree.body = kept
    shown: list[Any] = []
    scope.update(_show_=shown.append, shown=shown)
    exec(compile(ast.fix_missing_locations(tree), str(README), "exec"), scope)
    return scope


def dense_spectrum(H: torch.Tensor) -> np.ndarray:
    """Ascending eigenvalues of a dense symmetric matrix, by LAPACK in float64."""
    return np.linalg.eigvalsh(H.double().numpy())


def test_quick_start_runs_and_its_results_match_the_dense_hessian(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block saves run1.npz and spectrum.png
    model, X, y = trained_tanh_mlp(SIZES, samples=700, steps=100)
    other, _, _ = trained_tanh_mlp(SIZES, samples=700, steps=100, seed=1)
    loss_fn = nn.CrossEntropyLoss()
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=torch.float64)
    s2 = spectra.exact_spectrum(other, loss_fn, (X, y))
    before = copy.deepcopy(model.state_dict())
    scope = run_block(
        readme_block("import scipy.sparse.linalg, torch, spectra"),
        {"model": model, "dataset": torch.utils.data.TensorDataset(X, y), "v": v, "s2": s2},
    )

    # the reference: the Hessian of the mean loss over all 700 samples at once, in float64
    # (the block's DataLoader splits them 500 + 200)
    ref = reference_hessian(copy.deepcopy(model).double(), loss_fn, X.double(), y)
    lam = dense_spectrum(ref)
    scale = float(np.abs(lam).max())
    H, s, top, density, tr = (scope[k] for k in ("H", "s", "top", "density", "tr"))

    torch.testing.assert_close(H @ v, ref @ v, rtol=1e-9, atol=1e-9 * scale * v.norm())
    np.testing.assert_allclose(
        scipy.sparse.linalg.eigsh(H.to_scipy(), k=5)[0], lam[-5:], atol=1e-8 * scale
    )
    # float32 exact spectrum (the default dtype): float32 rounding of the matrix
    np.testing.assert_allclose(np.sort(s.eigenvalues), lam, atol=1e-5 * scale)
    np.testing.assert_allclose(np.sort(np.asarray(s.top(5))), lam[-5:], atol=1e-5 * scale)
    assert top.all_converged
    err = np.abs(np.sort(top.eigenvalues.numpy()) - lam[-5:])
    assert np.all(err <= np.sort(top.residuals.numpy())[::-1].max() + 1e-9 * scale)
    assert abs(density.weights.sum() - 1) < 1e-12
    assert lam[0] - 1e-6 * scale <= density.eigenvalues.min()
    assert density.eigenvalues.max() <= lam[-1] + 1e-6 * scale
    assert abs(tr.estimate - lam.sum()) <= 4 * tr.stderr + 1e-9 * scale
    np.testing.assert_array_equal(spectra.Spectrum.load("run1.npz").eigenvalues, s.eigenvalues)
    assert (tmp_path / "spectrum.png").stat().st_size > 0
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())  # unmutated


def test_optimizer_block_runs_and_returns_the_loss_at_the_weights():
    model, X, y = trained_tanh_mlp(SIZES, samples=700, steps=0)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=64)
    first = next(iter(loader))
    with torch.no_grad():
        expected = loss_fn(model(first[0]), first[1])  # at the weights before the step
    start = [p.detach().clone() for p in model.parameters()]
    scope = run_block(
        readme_block("from entropy_opt import"),
        {"model": model, "loss_fn": loss_fn, "batches": itertools.cycle(loader)},
    )
    torch.testing.assert_close(scope["loss_at_x"].detach(), expected, rtol=1e-6, atol=0)
    diagnostics = scope["shown"][-1]  # the block's last line shows the diagnostics
    assert "gamma" in diagnostics, f"the README's optimizer block shows {diagnostics!r}"
    assert 1e-4 <= diagnostics["gamma"] <= 1e-4 * (1 + 1e-3) + 1e-12, diagnostics
    assert any(not torch.equal(a, p) for a, p in zip(start, model.parameters(), strict=True))


def test_hugging_face_block_runs_and_lanczos_converges_with_defaults():
    code = readme_block("from transformers import GPT2Config")
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 49  # pad = eos
    scope = run_block(
        code, {"spectra": spectra, "nn": nn, "torch": torch, "ids": ids, "mask": mask}
    )
    top = scope["top"]
    assert top.all_converged, top
    # the top eigenvalue agrees with an independent solver on the same operator
    ref = scipy.sparse.linalg.eigsh(scope["H"].to_scipy(), k=1, which="LA", tol=1e-8)[0]
    assert abs(float(top.eigenvalues[0]) - float(ref[0])) <= float(top.residuals[0]) + 1e-4 * abs(
        float(ref[0])
    )
