"""The one task builder: a run's data, split and batched, for every figure and experiment.

:func:`build_task` turns a :class:`figures.harness.RunConfig`'s ``data`` and
``data_kwargs`` into a :class:`Task`; :func:`evaluate` computes a split's eval-mode metrics.
Two kinds of task:

* ``"classification"``: every split is a pair of tensors ``(inputs, targets)``: images
  and labels, or Fig 3b's one-hot character lines and their next characters (the error
  is then per character).  Trained on shuffled mini-batches (:class:`~figures.loop.ImageStream`).
* ``"language"``: every split is one 1-D token-id stream, trained by truncated BPTT
  (:class:`~figures.loop.TokenStream`); the metrics add the perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import datasets as D
from .datasets import synthetic
from .loop import (
    ImageStream,
    RunningMetrics,
    TokenStream,
    batch_error,
    cross_entropy,
    evaluate_metrics,
    forward,
)

__all__ = ["Task", "build_task", "evaluate", "DATASETS", "CIFAR_MISSING"]

#: The data set's name when CIFAR-10 is absent and Fashion-MNIST stands in (caption, JSON).
CIFAR_MISSING = "Fashion-MNIST (CIFAR-10 not found: set HS_CIFAR10_DIR)"

#: ``data`` names :func:`build_task` knows, with the name written into captions and JSON.
DATASETS = {
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "synthetic-images": "synthetic teacher images (tests)",
    "synthetic-prototypes": "synthetic images (tests)",
    "austen": "Jane Austen's novels (janeaustenr)",
    "austen-lines": "Jane Austen's novels (janeaustenr)",
    "synthetic-lines": "synthetic text (tests)",
    "ptb": "Penn Treebank",
    "synthetic-tokens": "synthetic tokens (tests)",
}


@dataclass
class Task:
    """A dataset with its loss and metrics.

    ``kind`` is ``"classification"`` (``splits`` hold ``(x, y)`` tensors; error is the
    fraction of wrong argmaxes) or ``"language"`` (``splits`` hold 1-D id streams; the
    metrics are the mean cross-entropy per token ``loss``, its exponential ``perplexity``
    and the fraction of mispredicted tokens ``error``).  ``drop_last``: whether a training
    pass drops its last short batch (classification); ``info["dataset"]`` names the data.
    """

    kind: str
    splits: dict[str, Any]
    batch_size: int
    seed: int
    bptt: int = 50
    eval_batch_size: int = 1000
    info: dict[str, Any] = field(default_factory=dict)
    drop_last: bool = True

    def stream(self) -> ImageStream | TokenStream:
        """The endless training mini-batch stream, at its start."""
        if self.kind == "classification":
            x, y = self.splits["train"]
            return ImageStream(x, y, self.batch_size, self.seed, drop_last=self.drop_last)
        return TokenStream(self.splits["train"], self.batch_size, self.bptt)

    def bn_batches(self, count: int) -> Iterator[Any]:
        """The first ``count`` training mini-batches in a fixed order (no stream state)."""
        if self.kind == "classification":
            x, _ = self.splits["train"]
            for i in range(min(count, math.ceil(len(x) / self.batch_size))):
                yield x[i * self.batch_size : (i + 1) * self.batch_size]
        else:
            stream = TokenStream(self.splits["train"], self.batch_size, self.bptt)
            for _ in range(min(count, stream.per_pass)):
                (x, _state), _ = stream.next()
                yield x


def _three_channels(x: Tensor) -> Tensor:
    """(N, 1, H, W) grey images -> (N, 3, H, W), the channel repeated."""
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _image_files(name: str, kw: dict[str, Any]) -> tuple[tuple, tuple, str]:
    """Train and test images of a real data set; CIFAR-10 falls back to Fashion-MNIST when
    ``fallback="fashion-mnist"`` and CIFAR-10 is absent."""
    root = kw.get("root")
    if name == "cifar10" and kw.get("fallback") == "fashion-mnist":
        try:
            return D.load_cifar10(root, "train"), D.load_cifar10(root, "test"), DATASETS[name]
        except D.MissingDataError:
            return (
                D.load_fashion_mnist(split="train"),
                D.load_fashion_mnist(split="test"),
                CIFAR_MISSING,
            )
    load = D.load_mnist if name == "mnist" else D.load_cifar10
    return load(root, split="train"), load(root, split="test"), DATASETS[name]


def _images(name: str, kw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The splits of an image data set (see :func:`build_task`)."""
    seed = kw.get("data_seed", 0)
    if name == "synthetic-images":
        n = kw.get("n", 512)
        x, y = synthetic.teacher_images(
            n, kw.get("shape", [1, 28, 28]), kw.get("classes", 10), 1234
        )
        nt = kw.get("test_size", n // 8)
        train, test = (x[nt:], y[nt:]), (x[:nt], y[:nt])
        val_size, dataset = kw.get("val_size", n // 8), DATASETS[name]
    elif name == "synthetic-prototypes":
        train = synthetic.prototype_images(max(kw.get("n", 512), 1), seed)
        test = synthetic.prototype_images(kw["test_head"], seed + 1)
        val_size, dataset = kw.get("val_size", 0), DATASETS[name]
    else:
        train, test, dataset = _image_files(name, kw)
        if kw.get("test_size"):
            test = D.subsample(*test, kw["test_size"], seed=0)
        val_size = kw.get("val_size", 5000)
    if "test_head" in kw:
        test = (test[0][: kw["test_head"]], test[1][: kw["test_head"]])
    splits: dict[str, Any] = {}
    if val_size:
        train, splits["val"] = D.split_off(*train, val_size, seed=0)
    size = kw.get("train_size")
    if size and size != len(train[0]):  # all of them: kept in their order
        train = D.subsample(*train, size, seed=seed)
    splits.update(train=train, test=test)
    if kw.get("channels") == 3:
        splits = {k: (_three_channels(x), y) for k, (x, y) in splits.items()}
    return {k: splits[k] for k in ("train", "val", "test") if k in splits}, dataset


def _lines(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Fig 3b's splits: ``lines`` lines of ``line_len`` characters from the start of the
    text, then ``test_lines`` lines right after them (see :func:`figures.datasets.char_lines`)."""
    n_train, n_test, line_len = kw["lines"], kw["test_lines"], kw.get("line_len", 32)
    vocab_size = kw.get("vocab_size", 96)
    if name == "austen-lines":
        text = D.load_austen(kw.get("root"))
    else:
        text = synthetic.letter_text((n_train + n_test) * line_len + 1, kw.get("data_seed", 0))
    tr = D.char_lines(text, n_train, line_len, vocab_size, start=0)
    te = D.char_lines(text, n_test, line_len, vocab_size, start=n_train * line_len)
    return {"train": (tr.inputs, tr.targets), "test": (te.inputs, te.targets)}


def _streams(name: str, kw: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any], int]:
    """Token-stream splits, the vocabulary size and the default BPTT length."""
    if name == "austen":
        text = D.load_austen(kw.get("root"))
        text = text[: kw["chars"]] if kw.get("chars") else text
        vocab = D.CharVocab.from_text(text)
        parts = D.char_splits(text, tuple(kw.get("fractions", (0.8, 0.1, 0.1))))
        splits = dict(zip(("train", "val", "test"), map(vocab.encode, parts), strict=True))
        return splits, {"vocab": len(vocab), "chars": len(text)}, 50
    if name == "ptb":
        corpus = D.load_ptb(kw.get("root"))
        tokens = kw.get("tokens")
        splits = {s: getattr(corpus, s)[:tokens] for s in ("train", "valid", "test")}
        splits["val"] = splits.pop("valid")
        return splits, {"vocab": len(corpus.vocab)}, 35
    vocab_size = kw.get("vocab", 50)
    ids = synthetic.markov_tokens(kw.get("n", 20_000), vocab_size, 1234)
    a, b = int(0.8 * len(ids)), int(0.9 * len(ids))
    return {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}, {"vocab": vocab_size}, 20


def build_task(config: Any) -> Task:
    """Load the data a :class:`~figures.harness.RunConfig` names and split it.

    ``data_kwargs`` by dataset (``root`` points any real one at its files):

    * ``mnist`` / ``cifar10``: ``val_size`` (default 5000; 0 = no validation split) held
      out of the training set with a fixed seed; ``train_size`` subsamples the rest
      (seeded by ``data_seed``, default 0; its full size keeps the order); ``test_size``
      subsamples the test set, ``test_head`` takes its first that many.  ``channels=3``
      repeats grey channels; ``fallback="fashion-mnist"`` stands in for an absent CIFAR-10.
    * ``synthetic-images`` (the harness's tests): ``n`` (default 512) Gaussian images of
      ``shape`` (default [1, 28, 28]) labelled by a linear teacher over ``classes`` (10);
      ``val_size``/``test_size`` (default n // 8 each).
    * ``synthetic-prototypes`` (the figures' smoke runs): ``n`` noisy copies of ten class
      prototypes (1 x 28 x 28) drawn with ``data_seed``, ``test_head`` more with
      ``data_seed + 1``; no validation split unless ``val_size``.
    * ``austen-lines`` / ``synthetic-lines`` (Fig 3b): ``lines`` and ``test_lines`` lines of
      ``line_len`` characters over a ``vocab_size`` vocabulary, one-hot inputs.
    * ``austen``: the joined novels split 80/10/10 by characters (``fractions``);
      ``chars`` keeps the first that many characters of the text before splitting
      (default: all); ``bptt`` (default 50), ``eval_batch_size`` (default 10).  The
      vocabulary is every character of the (kept) text.
    * ``ptb``: the standard splits; ``bptt`` (default 35), ``tokens`` truncates each split.
    * ``synthetic-tokens``: ``n`` tokens (default 20,000), ``vocab`` (default 50), split
      80/10/10; ``bptt`` (default 20).

    Every classification task also reads ``drop_last`` (default True: each training step
    sees ``batch_size`` samples) and ``eval_batch_size`` (default 1000).
    """
    kw = dict(config.data_kwargs)
    name, seed, bs = config.data, config.seed, config.batch_size
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    if name in ("austen", "ptb", "synthetic-tokens"):
        splits, info, bptt = _streams(name, kw)
        return Task(
            "language",
            splits,
            bs,
            seed,
            bptt=kw.get("bptt", bptt),
            eval_batch_size=kw.get("eval_batch_size", 10),
            info={**info, "dataset": DATASETS[name]},
        )
    if name in ("austen-lines", "synthetic-lines"):
        splits, dataset = _lines(name, kw), DATASETS[name]
    else:
        splits, dataset = _images(name, kw)
    return Task(
        "classification",
        splits,
        bs,
        seed,
        eval_batch_size=kw.get("eval_batch_size", 1000),
        info={"dataset": dataset},
        drop_last=kw.get("drop_last", True),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, split: str, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Eval-mode metrics on one split: ``loss`` and ``error`` (for language tasks also
    ``perplexity`` = exp(mean cross-entropy per token), the state carried across windows)."""
    if task.kind == "classification":
        return evaluate_metrics(
            model, task.splits[split], cross_entropy, task.eval_batch_size, device
        )
    running = RunningMetrics()
    was = model.training
    model.eval()
    try:
        stream = TokenStream(task.splits[split], task.eval_batch_size, task.bptt)
        for _ in range(stream.per_pass):
            (x, state), y = stream.next()
            logits, new_state = forward(model, (x.to(device), state))
            stream.carry(new_state)
            y = y.to(device)
            running.add(cross_entropy(logits, y), batch_error(logits, y), y.numel())
    finally:
        model.train(was)
    return {"loss": running.loss, "error": running.error, "perplexity": math.exp(running.loss)}
