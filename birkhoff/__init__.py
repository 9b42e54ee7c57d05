"""The top layer: the ``birkhoff`` command, assembled from the subcommands of the
codec (:mod:`compressor.cli`) and of evaluation (:mod:`eval_jobs.cli`), with the
workflow's source resolver injected into evaluation. Layers, bottom up:
numba_kernels <- compressor <- eval_jobs <- workflows <- birkhoff (tests/test_layers.py)."""
