"""Real-model cases for tests/test_real_models.py (curvlinops-style: one small builder each).

Every builder returns a :class:`Case`: a tiny float64 model in eval mode (a few hundred
to ~1,200 parameters, so dense float64 references are cheap), the loss the user writes,
the data as a LIST of uneven batches, the operator options a user would pass
(``forward=``, ``batch_dim=``), and what an independent reference needs: a
``reduction="sum"`` copy of the loss and the count of counted loss terms per batch.

The reference definition (what the operators must compute, see the test module):

    L(theta) = sum_b S_b(theta) / T    (mean-reduced loss)
    L(theta) = sum_b S_b(theta)        (sum-reduced loss)

with S_b the batch's sum-reduced loss and T the total number of counted terms (non-ignored
targets; with class ``weight=`` the sum of the counted targets' weights).  Rows of an
``nn.Embedding``'s ``padding_idx`` are constants (PyTorch never gives them a gradient).

Hugging Face models are built from configs with random weights (no downloads) and keep
their default attention implementation (``sdpa``).  All parameters are perturbed by
N(0, 0.3^2) after initialisation, so the padding rows (which HF and ``nn.Embedding``
initialise to zero), LayerNorm weights and biases are generic, non-zero values.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spectra.curvature import default_forward

F64 = torch.float64

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Case:
    """One model + loss + data problem and what its reference needs.

    Attributes:
        name: the pytest id.
        model: float64 model in eval mode.
        loss_fn: the loss as the user writes it (given to the operators).
        batches: the data, a list of >= 2 uneven ``(inputs, targets)`` batches.
        one_batch: the same data as a single ``(inputs, targets)`` batch, for
            batch-split invariance (sequences re-padded to a common length).
        options: operator options the user passes (``forward=``, ``batch_dim=``, ...).
        forward: ``forward(model, inputs) -> outputs`` used by the reference (the
            user's ``forward=``, or the default call convention).
        sum_loss: the same loss with ``reduction="sum"`` (S_b).
        count: counted loss terms in a batch's targets (for a mean); None for a sum.
        reduction: "mean" or "sum": the reduction the user's loss has.
        batch_dim: the sample dimension of inputs and targets.
        rtol: relative tolerance for comparing against the dense reference
            (float64 round-off, or the float32 floor of float32-internal ops).
        note: why the tolerance is what it is.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[..., torch.Tensor]
    batches: list[tuple[Any, Any]]
    one_batch: tuple[Any, Any]
    options: dict[str, Any]
    forward: Callable[[nn.Module, Any], Any]
    sum_loss: Callable[..., torch.Tensor]
    count: Callable[[Any], float] | None
    reduction: str = "mean"
    batch_dim: int = 0
    rtol: float = 1e-9
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_count(self) -> float:
        """T: counted loss terms over all batches (1.0 for a sum-reduced loss)."""
        if self.count is None:
            return 1.0
        return float(sum(float(self.count(y)) for _, y in self.batches))


def perturb_(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """Move every parameter off its initialisation (padding rows included)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def not_ignored(ignore_index: int = -100) -> Callable[[torch.Tensor], float]:
    def count(y: torch.Tensor) -> float:
        return float((y != ignore_index).sum())

    return count


def samples_along(dim: int) -> Callable[[torch.Tensor], float]:
    def count(y: torch.Tensor) -> float:
        return float(y.shape[dim])

    return count


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _built(make: Callable[..., nn.Module], *args: Any) -> nn.Module:
    """``make(*args)`` (its warnings silenced) in float64, perturbed, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return perturb_(make(*args).to(F64)).eval()


def _classifier_case(
    name: str,
    model: nn.Module,
    batches: list[tuple[Any, Any]],
    one_batch: tuple[Any, Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    **fields: Any,
) -> Case:
    """A float64 classifier's case: mean cross-entropy over the samples (dim 0); ``forward``
    (if given) is the user's ``forward=`` option."""
    return Case(
        name=name,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        batches=batches,
        one_batch=one_batch,
        options={} if forward is None else {"forward": forward},
        forward=default_forward if forward is None else forward,
        sum_loss=nn.CrossEntropyLoss(reduction="sum"),
        count=samples_along(0),
        note="float64 throughout",
        **fields,
    )


#: The tiny transformer of every Hugging Face case but GPT-2 (which names these differently).
_TINY_HF = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
#: ... as a 3-class classifier without dropout (BERT, ViT).
_TINY_HF_CLASSIFIER = dict(
    **_TINY_HF, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
)


# ---------------------------------------------------------------------------------------
# token batches for the Hugging Face models
# ---------------------------------------------------------------------------------------
def _token_batch(
    lengths: list[int],
    width: int,
    vocab: tuple[int, int],
    pad: int,
    eos: int | None,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Right-padded ids (eos-terminated if eos is given), attention mask and -100 labels."""
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(vocab[0], vocab[1], (n,), generator=gen)
        if eos is not None:
            ids[i, n - 1] = eos
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _repad(batch: dict[str, torch.Tensor], width: int, pad: int) -> dict[str, torch.Tensor]:
    extra = width - batch["input_ids"].shape[1]
    return {
        "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad),
        "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=0),
        "labels": F.pad(batch["labels"], (0, extra), value=-100),
    }


def _cat_dicts(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}


def causal_lm_forward(m: nn.Module, b: Any) -> torch.Tensor:
    """The natural causal-LM user code: next-token logits with the class dim at 1."""
    return m(**b).logits[:, :-1].transpose(1, 2)


def _causal_lm_case(
    name: str, model: nn.Module, pad: int, eos: int, vocab: int, rtol: float, note: str
) -> Case:
    gen = _gen(1)
    raw = [
        _token_batch([6, 4, 5], 6, (3, vocab), pad, eos, gen),
        _token_batch([5, 2], 5, (3, vocab), pad, eos, gen),
    ]

    def split(b):
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        return inputs, b["labels"][:, 1:]

    one = _cat_dicts([_repad(b, 6, pad) for b in raw])
    return Case(
        name=name,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        batches=[split(b) for b in raw],
        one_batch=split(one),
        options={"forward": causal_lm_forward},
        forward=causal_lm_forward,
        sum_loss=nn.CrossEntropyLoss(reduction="sum"),
        count=not_ignored(),
        rtol=rtol,
        note=note,
        extra={"raw_batches": raw, "pad": pad},
    )


# ---------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------
def gpt2() -> Case:
    """HF GPT2LMHeadModel (tied lm_head), pad = eos, attention mask, -100 labels. n = 1,144."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(10)
    eos = 2
    no_dropout = dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.0)
    tokens = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    cfg = GPT2Config(
        vocab_size=24, n_positions=8, n_embd=8, n_layer=1, n_head=2, **tokens, **no_dropout
    )
    model = _built(GPT2LMHeadModel, cfg)
    return _causal_lm_case("gpt2", model, eos, eos, 24, 1e-9, "float64 throughout")


def llama() -> Case:
    """HF LlamaForCausalLM: RMSNorm, rotary, GQA (1 kv head), pad = eos = padding_idx. n = 984."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    eos = 2
    tokens = dict(bos_token_id=1, eos_token_id=eos, pad_token_id=eos)
    cfg = LlamaConfig(
        vocab_size=24,
        **_TINY_HF,
        num_key_value_heads=1,
        max_position_embeddings=16,
        **tokens,
        tie_word_embeddings=False,
    )
    model = _built(LlamaForCausalLM, cfg)
    # LlamaRMSNorm computes in float32 (hidden_states.to(torch.float32)) and casts back,
    # so every second derivative through a norm carries float32 rounding: the operators
    # and the references differ by up to 2.5e-7 of the largest entry (see test_real_models).
    return _causal_lm_case(
        "llama",
        model,
        eos,
        eos,
        24,
        2e-6,
        "LlamaRMSNorm and rotary cos/sin are computed in float32",
    )


def bert() -> Case:
    """HF BertForSequenceClassification, right padding (pad id 0 = padding_idx), mask. n = 987."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(12)
    cfg = BertConfig(vocab_size=24, max_position_embeddings=8, **_TINY_HF_CLASSIFIER)
    model = _built(BertForSequenceClassification, cfg)
    gen = _gen(2)
    raw = [
        _token_batch([6, 3, 5], 6, (1, 24), 0, None, gen),
        _token_batch([4, 5], 5, (1, 24), 0, None, gen),
    ]
    labels = [torch.randint(0, 3, (3,), generator=gen), torch.randint(0, 3, (2,), generator=gen)]

    def inputs(b):
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    one = _cat_dicts([inputs(_repad(b, 6, 0)) for b in raw])

    def forward(m, b):
        return m(**b).logits

    return _classifier_case(
        "bert",
        model,
        [(inputs(b), y) for b, y in zip(raw, labels, strict=True)],
        (one, torch.cat(labels)),
        forward,
        extra={"raw_batches": raw, "labels": labels},
    )


def vit() -> Case:
    """HF ViTForImageClassification on 1 x 8 x 8 images, 4 x 4 patches. n = 827."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(13)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, **_TINY_HF_CLASSIFIER)
    model = _built(ViTForImageClassification, cfg)
    gen = _gen(3)
    # float32-representable pixels: a float32 copy of the data is cast back exactly
    xs = [
        torch.randn(3, 1, 8, 8, generator=gen).to(F64),
        torch.randn(2, 1, 8, 8, generator=gen).to(F64),
    ]
    ys = [torch.randint(0, 3, (3,), generator=gen), torch.randint(0, 3, (2,), generator=gen)]

    def forward(m, b):
        return m(pixel_values=b["pixel_values"]).logits

    return _classifier_case(
        "vit",
        model,
        [({"pixel_values": x}, y) for x, y in zip(xs, ys, strict=True)],
        ({"pixel_values": torch.cat(xs)}, torch.cat(ys)),
        forward,
    )


class EncoderClassifier(nn.Module):
    """Linear in, nn.TransformerEncoder (batch_first=True), masked mean pool, Linear out."""

    def __init__(self, features: int = 4, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(features, d)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1)
        self.head = nn.Linear(d, classes)

    def forward(self, src: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.inp(src), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def _pad_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)


def encoder_batch_first() -> Case:
    """nn.TransformerEncoder(batch_first=True) with src_key_padding_mask. n = 667."""
    torch.manual_seed(14)
    model = _built(EncoderClassifier)
    gen = _gen(4)
    lengths = [[5, 3, 4], [2, 4]]
    widths = [5, 4]
    batches = []
    for ls, w in zip(lengths, widths, strict=True):
        src = torch.randn(len(ls), w, 4, generator=gen, dtype=F64)
        pad = _pad_mask(ls, w)
        src = src.masked_fill(pad.unsqueeze(-1), 0.0)
        batches.append(((src, pad), torch.randint(0, 3, (len(ls),), generator=gen)))
    src1 = torch.cat([batches[0][0][0], F.pad(batches[1][0][0], (0, 0, 0, 1))])
    pad1 = torch.cat([batches[0][0][1], F.pad(batches[1][0][1], (0, 1), value=True)])
    one = ((src1, pad1), torch.cat([y for _, y in batches]))
    return _classifier_case("encoder_batch_first", model, batches, one)


def _time_major_tagging_case(
    name: str, model: nn.Module, batches: list[tuple[Any, Any]], one_batch: tuple[Any, Any]
) -> Case:
    """A float64 time-major tagger's case: (T, B) targets with -100 pads, ``batch_dim=1``."""
    return Case(
        name=name,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        batches=batches,
        one_batch=one_batch,
        options={"batch_dim": 1},
        forward=default_forward,
        sum_loss=nn.CrossEntropyLoss(reduction="sum"),
        count=not_ignored(),
        batch_dim=1,
        note="float64 throughout",
    )


class TimeMajorTagger(nn.Module):
    """nn.TransformerEncoder(batch_first=False) tagging (L, B) tokens; outputs (L, C, B).

    Inputs are all time-major, (src (L, B, F), pad (L, B) bool), so that one
    ``batch_dim=1`` names the sample dimension of every input and of the (L, B) targets.
    """

    def __init__(self, features: int = 4, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(features, d)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0)  # batch_first=False
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, src: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.inp(src), src_key_padding_mask=pad.T)
        return self.head(h).permute(0, 2, 1)


def encoder_time_major() -> Case:
    """nn.TransformerEncoder(batch_first=False), (L, B, F) inputs, batch_dim=1, -100 pads."""
    torch.manual_seed(15)
    model = _built(TimeMajorTagger)
    gen = _gen(5)
    lengths = [[4, 2, 3], [3, 4]]
    width = 4
    batches = []
    for ls in lengths:
        pad = _pad_mask(ls, width).T  # (L, B)
        src = torch.randn(width, len(ls), 4, generator=gen, dtype=F64)
        y = torch.randint(0, 3, (width, len(ls)), generator=gen).masked_fill(pad, -100)
        batches.append(((src, pad), y))
    one = (
        (torch.cat([b[0][0] for b in batches], 1), torch.cat([b[0][1] for b in batches], 1)),
        torch.cat([b[1] for b in batches], 1),
    )
    return _time_major_tagging_case("encoder_time_major", model, batches, one)


class TimeMajorLSTM(nn.Module):
    """2-layer nn.LSTM(batch_first=False) tagger: (T, B, F) -> (T, C, B)."""

    def __init__(self, features: int = 3, hidden: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        return self.head(h).permute(0, 2, 1)


def lstm_time_major() -> Case:
    """Time-major 2-layer LSTM, batch_dim=1, sequences of different lengths (-100 pads). n = 628."""
    torch.manual_seed(16)
    model = perturb_(TimeMajorLSTM().to(F64)).eval()
    gen = _gen(6)
    specs = [([5, 3, 4], 5), ([2, 4], 4)]  # (lengths, padded T) per batch
    batches = []
    for ls, width in specs:
        pad = _pad_mask(ls, width).T  # (T, B)
        x = torch.randn(width, len(ls), 3, generator=gen, dtype=F64).masked_fill(
            pad.unsqueeze(-1), 0.0
        )
        y = torch.randint(0, 4, (width, len(ls)), generator=gen).masked_fill(pad, -100)
        batches.append((x, y))
    # one batch: re-pad the shorter batch in time (a unidirectional LSTM's outputs at real
    # steps do not depend on later steps; the added steps are ignored targets)
    x1 = torch.cat([batches[0][0], F.pad(batches[1][0], (0, 0, 0, 0, 0, 1))], 1)
    y1 = torch.cat([batches[0][1], F.pad(batches[1][1], (0, 0, 0, 1), value=-100)], 1)
    return _time_major_tagging_case("lstm_time_major", model, batches, (x1, y1))


class BagOfWords(nn.Module):
    """nn.Embedding(padding_idx=0) summed over tokens, tanh, Linear."""

    def __init__(self, vocab: int = 30, d: int = 10, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids).sum(1)))


def _bow_data(
    gen: torch.Generator,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for ls, width in (([6, 2, 4, 5], 6), ([3, 5, 1], 5)):
        ids = torch.randint(1, 30, (len(ls), width), generator=gen).masked_fill(
            _pad_mask(ls, width), 0
        )
        batches.append((ids, torch.randint(0, 3, (len(ls),), generator=gen)))
    one = (
        torch.cat([batches[0][0], F.pad(batches[1][0], (0, 1))]),
        torch.cat([y for _, y in batches]),
    )
    return batches, one


def _bow_model() -> BagOfWords:
    model = perturb_(BagOfWords().to(F64)).eval()
    with torch.no_grad():  # the pad row stays nn.Embedding's zero (summed pads add nothing,
        model.emb.weight[0].zero_()  # so re-padding to a common length changes nothing)
    return model


def bag_of_words_padding_idx() -> Case:
    """nn.Embedding(padding_idx=0) with pads present; class-weighted mean CE. n = 333."""
    torch.manual_seed(17)
    model = _bow_model()
    batches, one = _bow_data(_gen(7))
    weight = torch.tensor([0.5, 1.0, 2.5], dtype=F64)

    def count(y: torch.Tensor) -> float:  # the mean's denominator: the targets' weights
        return float(weight[y].sum())

    return Case(
        name="bow_padding_idx",
        model=model,
        loss_fn=nn.CrossEntropyLoss(weight=weight),
        batches=batches,
        one_batch=one,
        options={},
        forward=default_forward,
        sum_loss=nn.CrossEntropyLoss(weight=weight, reduction="sum"),
        count=count,
        note="float64 throughout",
    )


def bag_of_words_plain_sum() -> Case:
    """The bag-of-words model with a plain function computing a SUM (no reduction= given)."""
    torch.manual_seed(18)
    model = _bow_model()
    batches, one = _bow_data(_gen(8))

    def summed(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="sum")

    return Case(
        name="bow_plain_sum",
        model=model,
        loss_fn=summed,
        batches=batches,
        one_batch=one,
        options={},
        forward=default_forward,
        sum_loss=summed,
        count=None,
        reduction="sum",
        note="float64 throughout",
    )


BUILDERS: dict[str, Callable[[], Case]] = {
    "gpt2": gpt2,
    "bert": bert,
    "vit": vit,
    "llama": llama,
    "encoder_batch_first": encoder_batch_first,
    "encoder_time_major": encoder_time_major,
    "lstm_time_major": lstm_time_major,
    "bow_padding_idx": bag_of_words_padding_idx,
    "bow_plain_sum": bag_of_words_plain_sum,
}

_CACHE: dict[str, Case] = {}


def get_case(name: str) -> Case:
    """The named case, built once per process (builders are deterministic)."""
    if name not in _CACHE:
        _CACHE[name] = BUILDERS[name]()
    return _CACHE[name]
