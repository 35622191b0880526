"""The paper's networks, each buildable at reduced width.

Small networks whose Hessians are diagonalised exactly (Fig. 3):

- ``small_lenet``: conv5x5(10) - maxpool - conv5x5(20) - maxpool - fc 320->128 - fc 128->10,
  47,658 parameters.
- ``small_mnistfc``: 784 -> 64 -> 10 with ReLU, 50,890 parameters (the paper's text says 32
  hidden units, its parameter count says 64; we follow the count).
- ``char_lstm_small``: ``nn.LSTM(96, 48)`` + ``nn.Linear(48, 96, bias=False)``, 32,640
  parameters.

Networks for the training and Fisher experiments (Entropy-SGD's benchmarks): ``mnistfc``,
``lenet_bn``, ``all_cnn_bn``, ``char_lstm`` (2 x 128) and ``ptb_lstm`` (2 x 1500).

``width`` multiplies every channel/hidden count (rounded, at least 1) so the same
architecture exists at a size a 2-core machine diagonalises in seconds; builders that take
``hidden`` set it directly.  All models take float inputs (N, C, H, W) for images, and
(batch, seq, vocab) one-hot or (batch, seq) int64 ids for the character LSTMs; they
return logits.  ``build(name, **kw)`` looks builders up in ``REGISTRY``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "small_lenet",
    "small_mnistfc",
    "char_lstm_small",
    "mnistfc",
    "lenet_bn",
    "all_cnn_bn",
    "char_lstm",
    "ptb_lstm",
    "CharLSTM",
    "unrolled_lstm_forward",
    "WordLSTM",
    "REGISTRY",
    "build",
    "count_parameters",
]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _scaled(n: int, width: float) -> int:
    """``round(n * width)``, at least 1, after checking that width is a positive number."""
    if not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive finite number, got {width!r}")
    return max(1, round(n * width))


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _probability(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _conv_block(
    c_in: int, c_out: int, kernel: int, *, stride: int = 1, padding: int = 0, bn: bool = False
) -> list[nn.Module]:
    """conv -> [BatchNorm] -> ReLU, as a list to splice into an ``nn.Sequential``."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    return [*layers, nn.ReLU()]


# --------------------------------------------------------------------------------------
# MNIST networks
# --------------------------------------------------------------------------------------


def small_lenet(width: float = 1.0) -> nn.Sequential:
    """small-LeNet for 1 x 28 x 28 inputs: 47,658 parameters at ``width=1``.

    conv5x5 (10w) - ReLU - maxpool2 -> 12x12; conv5x5 (20w) - ReLU - maxpool2 -> 4x4;
    fc 16*20w -> 128w - ReLU; fc -> 10.  Output: logits (N, 10).
    """
    c1, c2, hidden = _scaled(10, width), _scaled(20, width), _scaled(128, width)
    return nn.Sequential(
        *_conv_block(1, c1, 5),
        nn.MaxPool2d(2),
        *_conv_block(c1, c2, 5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def small_mnistfc(hidden: int = 64) -> nn.Sequential:
    """small-mnistfc: flatten 784 -> ``hidden`` - ReLU -> 10; 50,890 parameters at 64."""
    hidden = _positive("hidden", hidden)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def mnistfc(hidden: int = 1024, dropout: float = 0.5, batchnorm: bool = True) -> nn.Sequential:
    """mnistfc of Entropy-SGD: 784 -> hidden -> hidden -> 10.

    Each hidden layer is Linear - BatchNorm1d - ReLU - Dropout(``dropout``); the input gets
    Dropout(0.2), both as in Entropy-SGD's reference code.  ``dropout=0`` removes both
    dropouts; with ``batchnorm=False`` too it is the plain MLP.  1,867,786 parameters at
    the defaults.
    """
    hidden = _positive("hidden", hidden)
    _probability("dropout", dropout)
    layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(0.2 if dropout else 0.0)]
    for c_in in (784, hidden):
        layers += [nn.Linear(c_in, hidden)]
        layers += [nn.BatchNorm1d(hidden)] if batchnorm else []
        layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(hidden, 10))


def lenet_bn(width: float = 1.0, dropout: float = 0.5) -> nn.Sequential:
    """LeNet with BatchNorm (Entropy-SGD's ``mnistconv``) for 1 x 28 x 28 inputs.

    conv5x5 (20w) - BN - ReLU - maxpool3 -> 8x8 - Dropout; conv5x5 (50w) - BN - ReLU -
    maxpool2 -> 2x2 - Dropout; fc 4*50w -> 500w - BN - ReLU - Dropout; fc -> 10.
    132,220 parameters at ``width=1``.
    """
    c1, c2, hidden = _scaled(20, width), _scaled(50, width), _scaled(500, width)
    _probability("dropout", dropout)
    return nn.Sequential(
        *_conv_block(1, c1, 5, bn=True),
        nn.MaxPool2d(3),
        nn.Dropout(dropout),
        *_conv_block(c1, c2, 5, bn=True),
        nn.MaxPool2d(2),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(c2 * 2 * 2, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


# --------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------


def all_cnn_bn(width: float = 1.0, num_classes: int = 10, dropout: float = 0.5) -> nn.Sequential:
    """All-CNN-C (Springenberg et al. 2015) with BatchNorm after every conv, 3 x 32 x 32 in.

    Dropout(0.2) on the input (none if ``dropout=0``); 3x3 convs 96w, 96w, 96w/stride 2
    (-> 16x16); Dropout; 192w, 192w, 192w/stride 2 (-> 8x8); Dropout; 3x3 192w without
    padding (-> 6x6), 1x1 192w, 1x1 ``num_classes`` (BN and ReLU too, as in the original);
    global average pool.  Output (N, num_classes).  1,372,254 parameters at ``width=1``.
    """
    c1, c2 = _scaled(96, width), _scaled(192, width)
    num_classes = _positive("num_classes", num_classes)
    _probability("dropout", dropout)
    return nn.Sequential(
        nn.Dropout(0.2 if dropout else 0.0),
        *_conv_block(3, c1, 3, padding=1, bn=True),
        *_conv_block(c1, c1, 3, padding=1, bn=True),
        *_conv_block(c1, c1, 3, stride=2, padding=1, bn=True),
        nn.Dropout(dropout),
        *_conv_block(c1, c2, 3, padding=1, bn=True),
        *_conv_block(c2, c2, 3, padding=1, bn=True),
        *_conv_block(c2, c2, 3, stride=2, padding=1, bn=True),
        nn.Dropout(dropout),
        *_conv_block(c2, c2, 3, bn=True),
        *_conv_block(c2, c2, 1, bn=True),
        *_conv_block(c2, num_classes, 1, bn=True),  # ReLU here too, as in the original
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


# --------------------------------------------------------------------------------------
# Recurrent networks
# --------------------------------------------------------------------------------------


class CharLSTM(nn.Module):
    """Character LSTM: one-hot (or id) input -> stacked ``nn.LSTM`` -> linear to logits.

    Input (batch, seq, vocab) float one-hot, or (batch, seq) int64 ids (one-hot encoded
    here).  ``forward`` returns logits (batch, seq, vocab); with ``return_state=True`` also
    the LSTM state ``(h, c)``, each (layers, batch, hidden), for truncated BPTT.
    """

    def __init__(
        self, vocab: int, hidden: int, layers: int = 1, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        self.vocab = _positive("vocab", vocab)
        _positive("hidden", hidden)
        _positive("layers", layers)
        _probability("dropout", dropout)
        self.lstm = nn.LSTM(vocab, hidden, layers, batch_first=True, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab, bias=bias)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        if not x.is_floating_point():
            x = nn.functional.one_hot(x, self.vocab).to(self.out.weight.dtype)
        y, state = self.lstm(x, state)
        logits = self.out(self.drop(y))
        return (logits, state) if return_state else logits


class WordLSTM(nn.Module):
    """Word-level LSTM language model (Zaremba et al. 2014): embedding -> dropout ->
    stacked LSTM (dropout between layers) -> dropout -> linear to ``vocab`` logits.

    Input (batch, seq) int64 ids; output logits (batch, seq, vocab), plus the state with
    ``return_state=True``.  The embedding width equals ``hidden`` as in Zaremba's models.
    """

    def __init__(self, vocab: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        _positive("vocab", vocab)
        _positive("hidden", hidden)
        _positive("layers", layers)
        _probability("dropout", dropout)
        self.embed = nn.Embedding(vocab, hidden)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, dropout=dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        y, state = self.lstm(self.drop(self.embed(x)), state)
        logits = self.out(self.drop(y))
        return (logits, state) if return_state else logits


def unrolled_lstm_forward(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model(inputs)`` for a one-layer :class:`~figures.models.CharLSTM`, written as
    explicit LSTM cell steps (gates i, f, g, o as in ``nn.LSTM``).

    The same function of the same parameters, so the same Hessian; but every op has a
    ``torch.func.vmap`` batching rule, unlike the fused ``nn.LSTM`` kernel, which makes
    the Hessian's block products about 10x faster.  Inputs (N, L, V) one-hot floats.
    """
    lstm = model.lstm
    if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first:
        raise ValueError("unrolled_lstm_forward handles one-layer, batch-first LSTMs only")
    if not inputs.is_floating_point():
        inputs = nn.functional.one_hot(inputs, lstm.input_size).to(lstm.weight_ih_l0.dtype)
    w_hh = lstm.weight_hh_l0
    pre = inputs @ lstm.weight_ih_l0.T
    if lstm.bias:
        pre = pre + (lstm.bias_ih_l0 + lstm.bias_hh_l0)
    h = inputs.new_zeros(inputs.shape[0], lstm.hidden_size)
    c = torch.zeros_like(h)
    outs = []
    for step in pre.unbind(1):  # unbind, not pre[:, t]: one backward node, not L
        i, f, g, o = (step + h @ w_hh.T).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return model.out(torch.stack(outs, dim=1))


def char_lstm_small(hidden: int = 48, vocab: int = 96) -> CharLSTM:
    """Fig. 3b's char-LSTM: ``nn.LSTM(vocab, hidden)`` + ``nn.Linear(hidden, vocab,
    bias=False)``; 28,032 + 4,608 = 32,640 parameters at the defaults."""
    return CharLSTM(vocab, hidden, layers=1, dropout=0.0, bias=False)


def char_lstm(
    hidden: int = 128, layers: int = 2, vocab: int = 96, dropout: float = 0.5
) -> CharLSTM:
    """Entropy-SGD's char-LSTM (Karpathy's char-rnn setting): ``layers`` x ``hidden`` LSTM
    on one-hot characters, dropout between layers and before the output layer (biased)."""
    return CharLSTM(vocab, hidden, layers=layers, dropout=dropout, bias=True)


def ptb_lstm(
    hidden: int = 1500, layers: int = 2, vocab: int = 10000, dropout: float = 0.65
) -> WordLSTM:
    """PTB-LSTM, Zaremba et al.'s "large" model: 2 x 1500, dropout 0.65, 66,034,000
    parameters at the defaults (untied embedding and output weights)."""
    return WordLSTM(vocab, hidden, layers, dropout)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "small-lenet": small_lenet,
    "small-mnistfc": small_mnistfc,
    "char-lstm-small": char_lstm_small,
    "mnistfc": mnistfc,
    "lenet-bn": lenet_bn,
    "all-cnn-bn": all_cnn_bn,
    "char-lstm": char_lstm,
    "ptb-lstm": ptb_lstm,
}


def build(name: str, **kwargs: object) -> nn.Module:
    """Build a registered network by name (``_`` and ``-`` are interchangeable), e.g.
    ``build("small-lenet", width=0.25)``; keyword arguments go to the builder."""
    key = name.replace("_", "-").lower()
    if key not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(REGISTRY)}")
    return REGISTRY[key](**kwargs)
