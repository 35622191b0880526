"""figures.datasets readers and figures.fetch_data mechanics, on small fixtures written here."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from figures import datasets, fetch_data
from figures.datasets import DataFormatError, MissingDataError

# --------------------------------------------------------------------------------------
# IDX / MNIST
# --------------------------------------------------------------------------------------

_CODES = {np.dtype("u1"): 0x08, np.dtype("i2"): 0x0B, np.dtype("f4"): 0x0D}


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` as IDX (gzipped if the name ends in .gz)."""
    header = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.mark.parametrize("dtype", ["u1", "i2", "f4"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip(tmp_path: Path, dtype: str, suffix: str) -> None:
    arr = (
        (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        if dtype != "u1"
        else np.arange(24, dtype="u1").reshape(2, 3, 4)
    )
    out = datasets.read_idx(write_idx(tmp_path / f"x{suffix}", arr))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_errors(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good", np.zeros((3, 4), "u1")).read_bytes()
    cases = {
        "magic": b"\x01" + good[1:],
        "type code": good[:2] + b"\x07" + good[3:],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataFormatError):
            datasets.read_idx(tmp_path / name)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-8])
    with pytest.raises(DataFormatError, match="truncated"):
        datasets.read_idx(tmp_path / "cut.gz")
    with pytest.raises(MissingDataError):
        datasets.read_idx(tmp_path / "absent")


def write_mnist(directory: Path, n_train: int = 5, n_test: int = 3, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype="u1"))


@pytest.mark.parametrize(
    ("layout", "gz"), [("", False), ("package/data", False), ("MNIST/raw", True), ("raw", True)]
)
def test_load_mnist_layouts(tmp_path: Path, layout: str, gz: bool) -> None:
    write_mnist(tmp_path / layout, gz=gz)
    x, y = datasets.load_mnist(tmp_path, "train")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert x[0, 0, 0, 0] == 0.0 and x[0, 0, 0, 1] == 1.0 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4]
    assert datasets.load_mnist(tmp_path, "test")[0].shape == (3, 1, 28, 28)


def test_load_from_env_and_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist(tmp_path / "env")
    monkeypatch.setenv("HS_MNIST_DIR", str(tmp_path / "env"))
    assert len(datasets.load_mnist()[0]) == 5
    monkeypatch.delenv("HS_MNIST_DIR")
    write_mnist(tmp_path / "default" / "fashion-mnist" / "FashionMNIST/raw", n_train=4, gz=True)
    monkeypatch.setenv("HS_DATA_DIR", str(tmp_path / "default"))
    assert len(datasets.load_fashion_mnist(split="train")[1]) == 4
    # without HS_DATA_DIR: data/ in the current directory (where `make data` writes it)
    monkeypatch.delenv("HS_DATA_DIR")
    write_mnist(tmp_path / "cwd" / "data" / "mnist", n_train=3)
    monkeypatch.chdir(tmp_path / "cwd")
    assert datasets.data_dir() == Path("data") and len(datasets.load_mnist()[0]) == 3


def test_missing_and_bad_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("HS_MNIST_DIR", raising=False)
    with pytest.raises(MissingDataError, match="make data") as info:
        datasets.load_mnist()
    assert isinstance(info.value, FileNotFoundError) and "HS_MNIST_DIR" in str(info.value)
    with pytest.raises(MissingDataError, match="HS_FASHION_MNIST_DIR"):
        datasets.load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        datasets.load_mnist(tmp_path, "valid")
    write_mnist(tmp_path / "bad")
    write_idx(tmp_path / "bad/train-labels-idx1-ubyte", np.zeros(4, "u1"))
    with pytest.raises(DataFormatError, match="do not match"):
        datasets.load_mnist(tmp_path / "bad")


# --------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------


def write_cifar(directory: Path, n: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        pixels = np.full((n, 3072), i, dtype=np.uint8)
        pixels[:, 1024:2048] = 255  # green plane
        batch = {b"data": pixels, b"labels": [i % 10] * n, b"batch_label": name.encode()}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_load_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    x, y = datasets.load_cifar10(tmp_path, "train")
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    assert (x[:, 1] == 1.0).all() and x[0, 0, 0, 0] == 0.0 and x[-1, 0, 0, 0] == 4 / 255
    assert y.dtype == torch.int64 and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    monkeypatch.setenv("HS_CIFAR10_DIR", str(tmp_path / "cifar-10-batches-py"))
    assert datasets.load_cifar10(split="test")[1].tolist() == [5, 5]


def test_cifar10_missing_and_unsafe(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="HS_CIFAR10_DIR"):
        datasets.load_cifar10(tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(os.getcwd))  # not a numpy object
    with pytest.raises(DataFormatError, match="refusing"):
        datasets.load_cifar10(tmp_path)


# --------------------------------------------------------------------------------------
# Text and PTB
# --------------------------------------------------------------------------------------


def test_load_text(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes("Émma\r\nline\n".encode())
    assert datasets.load_text(tmp_path / "t.txt") == "Émma\r\nline\n"
    (tmp_path / "bad.txt").write_bytes(b"ok \xff")
    with pytest.raises(DataFormatError, match="UTF-8"):
        datasets.load_text(tmp_path / "bad.txt")
    with pytest.raises(MissingDataError):
        datasets.load_text(tmp_path / "absent.txt")


def test_load_ptb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "simple-examples" / "data"
    root.mkdir(parents=True)
    (root / "ptb.train.txt").write_text(" the cat <unk> \n the dog \n")
    (root / "ptb.valid.txt").write_text(" the cat \n")
    (root / "ptb.test.txt").write_text(" a dog \n")  # 'a' unseen -> <unk>
    corpus = datasets.load_ptb(tmp_path)
    assert corpus.vocab == ["the", "cat", "<unk>", "<eos>", "dog"]
    assert corpus.train.tolist() == [0, 1, 2, 3, 0, 4, 3]
    assert corpus.valid.tolist() == [0, 1, 3] and corpus.test.tolist() == [2, 4, 3]
    monkeypatch.setenv("HS_PTB_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(MissingDataError, match="HS_PTB_DIR"):
        datasets.load_ptb()


# --------------------------------------------------------------------------------------
# R serialisation / janeaustenr
# --------------------------------------------------------------------------------------


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def r_header(version: int = 3) -> bytes:
    head = b"X\n" + i32(version, 0x040201, 0x020300)
    return head + (i32(5) + b"UTF-8" if version == 3 else b"")


def r_char(raw: bytes | None, levels: int = 0x40) -> bytes:
    return i32(9 | levels << 12, -1) if raw is None else i32(9 | levels << 12, len(raw)) + raw


def r_strings(items: list[str]) -> bytes:
    return i32(16, len(items)) + b"".join(r_char(s.encode()) for s in items)


NAMES_SYMBOL = i32(1) + r_char(b"names")  # first use of the symbol `names`
NAMES_REF = i32(1 << 8 | 255)  # later uses: reference #1


def r_named_list(items: list[bytes], names: list[str], symbol: bytes) -> bytes:
    """VECSXP with a names attribute (pairlist: tag=symbol, value=STRSXP, end=NILVALUE)."""
    attr = i32(2 | 1 << 10) + symbol + r_strings(names) + i32(254)
    return i32(19 | 1 << 9, len(items)) + b"".join(items) + attr


def test_unserialize_strings_with_na_and_encodings() -> None:
    body = i32(16, 5) + r_char(b"plain") + r_char(None)
    body += r_char("café".encode(), 1 << 3) + r_char("café".encode("latin-1"), 1 << 2)
    body += r_char("ñ".encode(), 0)  # no flag: native encoding from the v3 header
    out = datasets.unserialize_r(r_header(3) + body)
    assert list(out) == ["plain", None, "café", "café", "ñ"] and out.attributes == {}
    assert datasets.unserialize_r(r_header(2) + i32(16, 1) + r_char(b"v2")) == ["v2"]
    assert datasets.unserialize_r(r_header() + i32(13, 3, 1, -(2**31), 7)) == [1, None, 7]
    with pytest.raises(DataFormatError, match="XDR"):
        datasets.unserialize_r(b"A\n" + body)
    with pytest.raises(DataFormatError, match="truncated"):
        datasets.unserialize_r(r_header() + body[:-3])


NOVELS = {"persuasion": ["Persuasion", "", "Anne Elliot"], "emma": ["EMMA", "Emma Woodhouse"]}


def write_rdata(directory: Path, novels: dict[str, list[str]]) -> Path:
    """A janeaustenr-like lazy-load database: Rdata.rdb chunks + gzip'd Rdata.rdx index."""
    directory.mkdir(parents=True, exist_ok=True)
    blob, where = b"", []
    for lines in novels.values():
        payload = r_header() + r_strings(lines)
        chunk = struct.pack(">I", len(payload)) + zlib.compress(payload)
        where.append(i32(13, 2, len(blob), len(chunk)))
        blob += chunk
    variables = r_named_list(where, list(novels), NAMES_SYMBOL)
    index = r_named_list(
        [variables, i32(19, 0), i32(10, 1, 1)], ["variables", "references", "compressed"], NAMES_REF
    )
    (directory / "Rdata.rdb").write_bytes(blob)
    (directory / "Rdata.rdx").write_bytes(gzip.compress(r_header() + index))
    return directory / "Rdata.rdb"


def test_read_rdata_and_austen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rdb = write_rdata(tmp_path / "janeaustenr" / "data", NOVELS)
    assert datasets.read_rdata(rdb) == NOVELS
    novels = datasets.austen_novels_from_rdata(rdb)
    assert list(novels) == ["emma", "persuasion"]  # publication order
    assert novels["persuasion"] == "Persuasion\n\nAnne Elliot"
    combined = "EMMA\nEmma Woodhouse\nPersuasion\n\nAnne Elliot"
    assert datasets.join_austen(novels) == combined
    assert datasets.load_austen(tmp_path / "janeaustenr") == combined  # decodes the package dir
    assert datasets.load_austen(tmp_path / "janeaustenr", novel="emma") == "EMMA\nEmma Woodhouse"
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "austen.txt").write_text("from text")
    monkeypatch.setenv("HS_AUSTEN_DIR", str(tmp_path / "txt"))
    assert datasets.load_austen() == "from text"
    monkeypatch.setenv("HS_AUSTEN_DIR", str(tmp_path / "none"))
    with pytest.raises(MissingDataError, match="make data"):
        datasets.load_austen()
    rdb.write_bytes(rdb.read_bytes()[:-5])
    with pytest.raises(DataFormatError):
        datasets.read_rdata(rdb)


# --------------------------------------------------------------------------------------
# Character-level datasets
# --------------------------------------------------------------------------------------


def test_char_vocab() -> None:
    vocab = datasets.CharVocab.from_text("hello world")
    assert vocab.chars == (" ", "d", "e", "h", "l", "o", "r", "w") and vocab.unk is None
    ids = vocab.encode("hold")
    assert ids.dtype == torch.int64 and vocab.decode(ids) == "hold"
    with pytest.raises(ValueError, match="'z'"):
        vocab.encode("zz")
    capped = datasets.CharVocab.from_text("aaabbcd", max_size=3, unk="?")
    assert capped.chars == ("a", "b", "?") and capped.decode(capped.encode("cabd")) == "?ab?"


def test_char_lines_shapes_and_shift() -> None:
    text = "".join(chr(33 + (i * 7) % 120) for i in range(2000))  # 120 distinct characters
    inputs, targets, vocab = datasets.char_lines(text, n_lines=8, line_len=5, vocab_size=96)
    assert inputs.shape == (8, 5, 96) and inputs.dtype == torch.float32
    assert targets.shape == (8, 5) and targets.dtype == torch.int64
    assert len(vocab) == 96 and vocab.unk is not None
    assert (inputs.sum(-1) == 1).all()
    ids = inputs.argmax(-1)
    assert torch.equal(ids[:, 1:], targets[:, :-1]) and torch.equal(ids[1:, 0], targets[:-1, -1])
    rare = set(text) - set(vocab.chars)
    assert len(rare) == 120 - 95
    assert torch.equal(vocab.encode(text[:41])[1:].view(8, 5), targets)
    with pytest.raises(ValueError, match="needs"):
        datasets.char_lines("short", n_lines=2, line_len=3)


def test_char_splits_and_bptt() -> None:
    text = "abcdefghij" * 10
    train, valid, test = datasets.char_splits(text)
    assert (len(train), len(valid), len(test)) == (80, 10, 10) and train + valid + test == text
    with pytest.raises(ValueError, match="fractions"):
        datasets.char_splits(text, (0.5, 0.5, 0.5))
    batched = datasets.batchify(torch.arange(23), 2)
    assert batched.tolist() == [list(range(11)), list(range(11, 22))]
    windows = list(datasets.bptt_batches(batched, bptt=4))
    assert [x.shape[1] for x, _ in windows] == [4, 4, 2]
    for x, y in windows:
        assert torch.equal(x + 1, y)
    with pytest.raises(ValueError):
        datasets.batchify(torch.arange(3), 2)


def test_subsample_is_reproducible() -> None:
    x, y = torch.arange(20.0).view(10, 2), torch.arange(10)
    xs, ys = datasets.subsample(x, y, 4, seed=1)
    assert torch.equal(xs[:, 0] / 2, ys.float()) and len(set(ys.tolist())) == 4
    assert torch.equal(datasets.subsample(x, y, 4, seed=1)[1], ys)
    with pytest.raises(ValueError):
        datasets.subsample(x, y, 11)


# --------------------------------------------------------------------------------------
# fetch_data: verification, pins, idempotent atomic install (no network: fake sources)
# --------------------------------------------------------------------------------------


def test_verify_hashes(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    abc_sha512 = (
        "3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
    )
    fetch_data.verify_integrity(f, f"sha512-{abc_sha512}")
    with pytest.raises(fetch_data.FetchError, match="integrity mismatch"):
        fetch_data.verify_integrity(f, fetch_data.MNIST_INTEGRITY)
    fetch_data.verify_sha256(f, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    with pytest.raises(fetch_data.FetchError, match="SHA256 mismatch"):
        fetch_data.verify_sha256(f, fetch_data.AUSTEN_DEB.sha256)


def test_unpinned_apt_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(cmd, cwd):
        calls.append(cmd)
        return "Package: r-cran-janeaustenr\nVersion: 2.0.0-1\nSHA256: 00\n"

    monkeypatch.setattr(fetch_data, "_run", fake_run)
    with pytest.raises(fetch_data.FetchError, match="pins 1.0.0-1") as info:
        fetch_data.fetch_deb(fetch_data.AUSTEN_DEB, tmp_path)
    assert "2.0.0-1" in str(info.value) and calls == [["apt-cache", "show", "r-cran-janeaustenr"]]


def fake_sources(monkeypatch: pytest.MonkeyPatch, log: list[str], pin: str = "v1") -> None:
    def build_ok(work: Path, out: Path) -> dict:
        log.append("ok")
        (out / "a.bin").write_bytes(b"12345")
        return {"source": "fake"}

    def build_fail(work: Path, out: Path) -> dict:
        log.append("fail")
        (out / "partial").write_bytes(b"x")
        raise fetch_data.FetchError("network down")

    monkeypatch.setattr(
        fetch_data,
        "SOURCES",
        {
            "ok": fetch_data.Source("ok", pin, build_ok),
            "bad": fetch_data.Source("bad", pin, build_fail),
        },
    )


def test_fetch_is_idempotent_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    fake_sources(monkeypatch, log)
    assert fetch_data.fetch(tmp_path, ["ok"]) == ["ok"]
    marker = json.loads((tmp_path / "ok" / fetch_data.MARKER).read_text())
    assert marker["pin"] == "v1" and marker["files"] == {"a.bin": 5}
    assert fetch_data.fetch(tmp_path, ["ok"]) == [] and log == ["ok"]  # second run: nothing
    (tmp_path / "ok" / "a.bin").write_bytes(b"12")  # damaged file -> fetched again
    assert fetch_data.fetch(tmp_path, ["ok"]) == ["ok"]
    fake_sources(monkeypatch, log, pin="v2")  # new pin -> fetched again
    assert fetch_data.fetch(tmp_path, ["ok"]) == ["ok"] and log == ["ok"] * 3
    assert fetch_data.main(["--dest", str(tmp_path), "--only", "bad"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no partial dir, no temp dir
    with pytest.raises(ValueError, match="unknown dataset"):
        fetch_data.fetch(tmp_path, ["nope"])
