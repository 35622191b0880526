"""float32 curvature is computed in IEEE float32 even where the process enabled TF32 or
oneDNN's reduced formats (cuDNN's convolutions run TF32 by default on NVIDIA GPUs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_hessian
from torch import nn

import spectra
from spectra._precision import ieee_float32, reduced_float32_settings


@pytest.fixture
def reduced_float32():
    """The process as a training script leaves it: float32 matrix products and
    convolutions allowed to run in TF32 (restored after the test)."""
    matmul = torch.get_float32_matmul_precision()
    with ieee_float32():  # saves and restores the per-operation settings
        try:
            torch.set_float32_matmul_precision("high")
            if hasattr(torch.backends.cudnn, "conv"):
                torch.backends.cudnn.conv.fp32_precision = "tf32"
            else:
                torch.backends.cudnn.allow_tf32 = True
            assert reduced_float32_settings(), "the fixture should have enabled TF32"
            yield
        finally:
            torch.set_float32_matmul_precision(matmul)


class _Recording(nn.Module):
    """A linear layer that records the float32 settings each forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.seen: list[list[str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(reduced_float32_settings())
        return torch.tanh(self.lin(x))


def test_every_curvature_evaluation_runs_in_ieee_float32_and_restores_the_settings(
    reduced_float32,
):
    torch.manual_seed(0)
    model = _Recording()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = reduced_float32_settings()
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), [(x, y)])
    op @ torch.randn(op.shape[0])
    spectra.exact_spectrum(model, nn.CrossEntropyLoss(), [(x, y)])
    assert model.seen and all(s == [] for s in model.seen)
    assert reduced_float32_settings() == before


def test_algorithms_run_their_own_products_in_ieee_float32(reduced_float32):
    """Lanczos, the trace estimators and SLQ orthogonalise and reduce with their own
    float32 matrix products: those run in IEEE float32 too."""
    seen = []

    class Diagonal(spectra.LinearOperator):
        def __init__(self) -> None:
            super().__init__(50, torch.float32, "cpu")
            self.d = torch.linspace(-1, 1, 50)

        def _matmat(self, V: torch.Tensor) -> torch.Tensor:
            seen.append(reduced_float32_settings())
            return self.d[:, None] * V

    op = Diagonal()
    spectra.lanczos(op, k=2, seed=0)
    spectra.trace(op, num_matvecs=12, seed=0)
    spectra.spectral_density(op, num_probes=2, num_steps=10, seed=0)
    assert seen and all(s == [] for s in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float32_conv_hessian_on_cuda_has_float32_accuracy_under_tf32(reduced_float32):
    """cuDNN runs float32 convolutions in TF32 unless told otherwise, and the fixture
    sends matrix products there too: the Hessian of a conv net in float32 on the GPU
    must still match the float64 reference to float32 accuracy (TF32 would leave
    errors ~1e-3 of the norm)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,))
    loss = nn.CrossEntropyLoss()
    ref = reference_hessian(net.double(), loss, x.double(), y).numpy()
    net.float().cuda()
    got = spectra.exact_spectrum(net, loss, [(x, y)], dtype=torch.float32).eigenvalues
    want = np.linalg.eigvalsh(ref)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
