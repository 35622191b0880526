"""The README's Hugging Face block, run as written (tiny GPT-2 from a config, random weights)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import spectra

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_hugging_face_block_runs_and_lanczos_converges_with_defaults():
    text = README.read_text()
    block = re.search(r"```python\n(from transformers import GPT2Config.*?)```", text, re.S)
    assert block is not None, "the README lost its Hugging Face example"
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 49  # pad = eos
    scope = {"spectra": spectra, "nn": nn, "torch": torch, "ids": ids, "mask": mask}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    top = scope["top"]
    assert top.all_converged, top
    # the top eigenvalue agrees with an independent solver on the same operator
    import scipy.sparse.linalg

    ref = scipy.sparse.linalg.eigsh(scope["H"].to_scipy(), k=1, which="LA", tol=1e-8)[0]
    assert abs(float(top.eigenvalues[0]) - float(ref[0])) <= float(top.residuals[0]) + 1e-4 * abs(
        float(ref[0]))
