"""Driver-side helper of test_multinode.py, run as its own process on the head node.

``probe ADDRESS PATH...``: one Ray task per path, on whatever node the scheduler
picks (the worker node: the head has no CPU), reports whether the path exists
there. Prints one JSON line.

``zoo [--replace-source-after-plan S3_URI FILE] -- ARGS...``: runs
``workflows/compress_all.py`` with ARGS in this process. With the option, the S3
object S3_URI is overwritten with FILE's bytes right after the driver planned the
first model's work, before any task reads the source: a source that changes
between planning and a worker's read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def probe(address: str, paths: list[str]) -> None:
    import ray

    ray.init(address=address, logging_level="WARNING")

    @ray.remote(num_cpus=1)
    def exists(p: str) -> dict:
        return {"path": p, "exists": os.path.exists(p), "node": ray.get_runtime_context().get_node_id()}

    head = ray.get_runtime_context().get_node_id()  # the driver's node
    print(json.dumps({"head": head, "seen": ray.get([exists.remote(p) for p in paths])}), flush=True)


def replace_after_plan(uri: str, data: bytes) -> None:
    from workflows import driver
    from workflows.store import S3Store

    bucket, _, key = uri[len("s3://"):].partition("/")
    original = driver.ModelRun._plan
    done = []

    def plan_then_replace(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not done:
            S3Store(f"s3://{bucket}", endpoint_url=self.store.endpoint_url).put_bytes(key, data)
            done.append(True)
        return out

    driver.ModelRun._plan = plan_then_replace


def main(argv: list[str]) -> int:
    if argv[0] == "probe":
        probe(argv[1], argv[2:])
        return 0
    assert argv[0] == "zoo"
    rest = argv[1:]
    if rest[0] == "--replace-source-after-plan":
        replace_after_plan(rest[1], Path(rest[2]).read_bytes())
        rest = rest[3:]
    assert rest[0] == "--"
    from workflows.compress_all import main as compress_all

    return compress_all(rest[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
