"""The paper's reproduction: networks, data, one training stack and one module per figure.

One stack, top to bottom (``python -m figures ...`` runs from the checkout):

| module | what it is |
|---|---|
| ``cli``, ``__main__`` | the one command line (figures and the four experiments) |
| ``catalog``, ``request`` | the figures of ``all``, in order, how to make or plan each, and the
  one ``FigureRequest`` (preset, output folder, device, cache, progress) each ``run`` takes |
| ``spectrum_figure``, ``fig2``, ``fig3c``, ``fig_fisher_compare`` | the figures |
| ``presets`` | each figure's configuration per preset, as data |
| ``figure_runs``, ``adam_moments`` | preset -> ``RunConfig`` -> ``train()`` or the cache |
| ``compare``, ``table1``, ``curves``, ``search``, ``recipes`` | the optimizer experiments |
| ``harness`` | ``RunConfig`` and ``train()``: logs, checkpoints, resume, an end-of-run hook |
| ``tasks`` | the one task builder: a config's data, split and batched; evaluation |
| ``loop`` | the one training loop, mini-batch streams, metrics, BatchNorm recompute |
| ``optimizers``, ``models`` | optimizers and networks by name |
| ``datasets`` | file readers, one format a module; synthetic data |
| ``cache``, ``report``, ``stats`` | content-addressed cache, output files, summary statistics |
| ``fetch_data`` | ``make data`` |
"""
