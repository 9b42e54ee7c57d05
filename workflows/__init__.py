"""Distributed compression of a model zoo: Ray tasks per shard, an object store
(local folder or S3) for the checkpoints, MLflow for the runs.

Kept out of :mod:`compressor` on purpose: this package imports Ray, boto3 and
MLflow (lazily, where it can) and the compressor must not.
"""
