"""Bad input gets a clear error before any work is done."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spectra

F64 = torch.float64


def data():
    return torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))


def model():
    return nn.Linear(3, 2).double()


def test_no_trainable_parameters():
    m = model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        spectra.hessian_operator(m, nn.CrossEntropyLoss(), data())


def test_empty_data():
    with pytest.raises(ValueError, match="empty"):
        spectra.hessian_operator(model(), nn.CrossEntropyLoss(), [])
    X, y = data()
    with pytest.raises(ValueError, match="empty"):
        spectra.hessian_operator(model(), nn.CrossEntropyLoss(), (X[:0], y[:0]))


def test_non_finite_loss_names_the_batch():
    X, y = data()
    X2 = X.clone()
    X2[1, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 1"):
        spectra.hessian_operator(model(), nn.CrossEntropyLoss(), [(X, y), (X2, y)])
    m = model()
    with torch.no_grad():
        m.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="batch 0"):
        spectra.hessian_operator(m, nn.CrossEntropyLoss(), (X, y))


@pytest.mark.parametrize(
    "vec, err, match",
    [
        (torch.zeros(7, dtype=F64), ValueError, "shape"),
        (torch.zeros(8, dtype=torch.float32), TypeError, "dtype"),
        (torch.zeros(8, 2, 2, dtype=F64), ValueError, "shape"),
        ([0.0] * 8, TypeError, "torch.Tensor"),
    ],
)
def test_wrong_vector(vec, err, match):
    H = spectra.hessian_operator(model(), nn.CrossEntropyLoss(), data())
    with pytest.raises(err, match=match):
        H @ vec
    assert H.matvecs == 0


def test_wrong_device():
    H = spectra.hessian_operator(model(), nn.CrossEntropyLoss(), data())
    with pytest.raises(ValueError, match="operator lives on cpu but the vector is on meta"):
        H @ torch.zeros(8, dtype=F64, device="meta")


def test_params_filter_matching_nothing_lists_names():
    with pytest.raises(ValueError, match="matches no trainable parameter; available: weight, bias"):
        spectra.hessian_operator(model(), nn.CrossEntropyLoss(), data(), params=["encoder.*"])


def test_reduction_none_is_refused():
    with pytest.raises(ValueError, match="reduction='mean'"):
        spectra.hessian_operator(model(), nn.CrossEntropyLoss(reduction="none"), data())


def test_malformed_batch():
    X, y = data()
    with pytest.raises(ValueError, match="batch 2"):
        spectra.hessian_operator(model(), nn.CrossEntropyLoss(), [(X, y), (X, y), X])


def test_bad_backend_and_chunk():
    with pytest.raises(ValueError, match="backend"):
        spectra.hessian_operator(model(), nn.CrossEntropyLoss(), data(), backend="jax")
    with pytest.raises(ValueError, match="chunk_size"):
        spectra.exact_hessian(model(), nn.CrossEntropyLoss(), data(), chunk_size=0)


def test_mixed_devices_refused():
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    m[1].to("meta")
    with pytest.raises(ValueError, match="several devices"):
        spectra.hessian_operator(
            m, nn.CrossEntropyLoss(), (torch.randn(4, 3), torch.randint(0, 2, (4,)))
        )


def test_a_spectrum_refuses_an_n_params_its_statistics_would_disagree_with():
    from spectra import Spectrum

    for bad in (-5, 0, 2.7, True):
        with pytest.raises(ValueError, match="n_params must be an integer >= 1"):
            Spectrum([1.0, 2.0], [0.5, 0.5], n_params=bad, kind="quadrature")
    with pytest.raises(ValueError, match="one value per parameter"):
        Spectrum.from_eigenvalues([-1.0, 2.0, 3.0], n_params=10)
    s = Spectrum.from_eigenvalues([-1.0, 2.0, 3.0])
    assert s.negative_mass() == pytest.approx(1.0) and s.trace() == pytest.approx(4.0)
    assert s.fraction_near_zero(float("inf")) == 1.0
    assert Spectrum([1.0], [1.0], n_params=4.0, kind="quadrature").n_params == 4
