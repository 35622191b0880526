"""Parameter counts (by hand formula) and forward shapes of figures.models."""

from __future__ import annotations

import math

import pytest
import torch

from figures import models
from figures.models import build, count_parameters


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def conv(c_in: int, c_out: int, k: int) -> int:
    return k * k * c_in * c_out + c_out


def bn(c: int) -> int:
    return 2 * c  # weight and bias; running statistics are buffers


def lstm(n_in: int, hidden: int, layers: int = 1) -> int:
    """Four gates, each with input and recurrent weights and two bias vectors (PyTorch)."""
    sizes = [n_in] + [hidden] * (layers - 1)
    return sum(4 * hidden * (i + hidden) + 2 * 4 * hidden for i in sizes)


def small_lenet_count(c1: int, c2: int, h: int) -> int:
    return conv(1, c1, 5) + conv(c1, c2, 5) + linear(16 * c2, h) + linear(h, 10)


def mnistfc_count(h: int) -> int:
    return linear(784, h) + bn(h) + linear(h, h) + bn(h) + linear(h, 10)


def lenet_bn_count(c1: int, c2: int, h: int) -> int:
    convs = conv(1, c1, 5) + bn(c1) + conv(c1, c2, 5) + bn(c2)
    return convs + linear(4 * c2, h) + bn(h) + linear(h, 10)


def all_cnn_count(c1: int, c2: int, classes: int = 10) -> int:
    layers = [(3, c1, 3), (c1, c1, 3), (c1, c1, 3), (c1, c2, 3), (c2, c2, 3), (c2, c2, 3),
              (c2, c2, 3), (c2, c2, 1), (c2, classes, 1)]  # fmt: skip
    return sum(conv(ci, co, k) + bn(co) for ci, co, k in layers)


def ptb_count(h: int, layers: int, vocab: int) -> int:
    return vocab * h + lstm(h, h, layers) + linear(h, vocab)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        # the paper's numbers, stated literally
        ("small-lenet", {}, 47_658),
        ("small-mnistfc", {}, 50_890),
        ("char-lstm-small", {}, 32_640),
        # hand formulas
        ("small-lenet", {"width": 0.5}, small_lenet_count(5, 10, 64)),
        ("small-lenet", {"width": 1.0}, small_lenet_count(10, 20, 128)),
        ("small-mnistfc", {"hidden": 32}, linear(784, 32) + linear(32, 10)),
        ("char-lstm-small", {"hidden": 8, "vocab": 20}, lstm(20, 8) + linear(8, 20, bias=False)),
        ("mnistfc", {}, mnistfc_count(1024)),
        ("mnistfc", {"hidden": 32}, mnistfc_count(32)),
        ("mnistfc", {"hidden": 32, "batchnorm": False}, mnistfc_count(32) - 2 * bn(32)),
        ("lenet-bn", {}, lenet_bn_count(20, 50, 500)),
        ("lenet-bn", {"width": 0.5}, lenet_bn_count(10, 25, 250)),
        ("all-cnn-bn", {}, all_cnn_count(96, 192)),
        ("all-cnn-bn", {"width": 0.125, "num_classes": 100}, all_cnn_count(12, 24, 100)),
        ("char-lstm", {}, lstm(96, 128, 2) + linear(128, 96)),
        ("char-lstm", {"hidden": 16, "layers": 3, "vocab": 30}, lstm(30, 16, 3) + linear(16, 30)),
        ("ptb-lstm", {"hidden": 20, "vocab": 50}, ptb_count(20, 2, 50)),
    ],
)
def test_parameter_counts(name: str, kwargs: dict, expected: int) -> None:
    assert count_parameters(build(name, **kwargs)) == expected


def test_formulas_reproduce_known_totals() -> None:
    """Cross-check the hand formulas against the numbers quoted in the literature/docs."""
    assert lstm(96, 48) == 28_032
    assert all_cnn_count(96, 192) == 1_372_254
    assert ptb_count(1500, 2, 10_000) == 66_034_000  # Zaremba et al.'s "66M"


def test_ptb_lstm_full_size_count() -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = models.ptb_lstm()
    assert count_parameters(model) == ptb_count(1500, 2, 10_000)


IMAGE_MODELS = [
    ("small-lenet", {"width": 0.25}, (1, 28, 28)),
    ("small-mnistfc", {"hidden": 8}, (1, 28, 28)),
    ("mnistfc", {"hidden": 16}, (1, 28, 28)),
    ("lenet-bn", {"width": 0.25}, (1, 28, 28)),
    ("all-cnn-bn", {"width": 0.05}, (3, 32, 32)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), IMAGE_MODELS)
@pytest.mark.parametrize("train", [True, False])
def test_image_model_forward(name: str, kwargs: dict, shape: tuple, train: bool) -> None:
    torch.manual_seed(0)
    model = build(name, **kwargs).train(train)
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


def test_char_lstm_small_forward_ids_and_one_hot_agree() -> None:
    torch.manual_seed(0)
    model = models.char_lstm_small(hidden=6, vocab=11)
    ids = torch.randint(0, 11, (2, 5))
    logits = model(ids)
    assert logits.shape == (2, 5, 11)
    one_hot = torch.nn.functional.one_hot(ids, 11).float()
    torch.testing.assert_close(model(one_hot), logits)
    logits2, (h, c) = model(ids, return_state=True)
    assert h.shape == c.shape == (1, 2, 6)


def test_char_lstm_and_ptb_lstm_forward() -> None:
    torch.manual_seed(0)
    char = models.char_lstm(hidden=8, layers=2, vocab=13).eval()
    assert char(torch.randint(0, 13, (4, 7))).shape == (4, 7, 13)
    ptb = models.ptb_lstm(hidden=8, layers=2, vocab=17).eval()
    out, (h, _) = ptb(torch.randint(0, 17, (3, 5)), return_state=True)
    assert out.shape == (3, 5, 17) and h.shape == (2, 3, 8)


def test_registry_and_build_names() -> None:
    assert set(models.REGISTRY) == {
        "small-lenet", "small-mnistfc", "char-lstm-small", "mnistfc",
        "lenet-bn", "all-cnn-bn", "char-lstm", "ptb-lstm",
    }  # fmt: skip
    assert count_parameters(build("small_lenet", width=0.25)) == count_parameters(
        models.small_lenet(width=0.25)
    )
    with pytest.raises(KeyError, match="unknown model"):
        build("resnet")


@pytest.mark.parametrize("width", [0, -1.0, math.nan, math.inf, "1"])
def test_bad_width_rejected(width: object) -> None:
    with pytest.raises(ValueError, match="width"):
        models.small_lenet(width=width)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        models.all_cnn_bn(width=width)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("builder", "kwargs", "match"),
    [
        (models.small_mnistfc, {"hidden": 0}, "hidden"),
        (models.mnistfc, {"dropout": 1.0}, "dropout"),
        (models.char_lstm_small, {"vocab": 0}, "vocab"),
        (models.char_lstm, {"layers": 0}, "layers"),
        (models.ptb_lstm, {"hidden": 2.5}, "hidden"),
        (models.all_cnn_bn, {"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_arguments_rejected(builder, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        builder(**kwargs)
