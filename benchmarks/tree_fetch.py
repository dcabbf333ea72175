"""Fetching a snapshot stored per tensor (hundreds of files) from S3 into a local copy.

    .venv/bin/python benchmarks/tree_fetch.py --threads 1,4 --repeats 5

A worker fetches a snapshot's tree before it loads the model (`workers.models.fetch_tree`),
and a snapshot is stored one tensor per file, so that a consolidation rewrites only the tensors
it changes. The tree here has SmolLM2-135M's layout in fp16: 30 layers of 9 tensors plus the
embedding and the final norm (272 files, 258 MiB, from 1 KiB norms to a 54 MiB embedding),
random values. It is stored once in moto's S3 server (in a child process), then fetched with
`get_tree` into a fresh folder, `FETCH_THREADS` files at a time for each `--threads` value, with
and without a `tee` (a cold download passes every file's bytes on in path order), in turn within
each round. The raw side is the `minio` client's `fget_object` of every file, one after
another. Prints the median seconds and MB/s of each. Not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from artifact_throughput import MB, free_port, start_moto
from common import ints
from minio import Minio
from safetensors.numpy import save_file

import registry.artifacts.trees as trees
from registry.artifacts import MinioStore, blob_key, put_tree, read_manifest

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN),
                                          "model.norm.weight": (HIDDEN,)}  # fmt: skip
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (KV, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
        }
    return shapes


def write_tree(folder: Path) -> int:
    rng = np.random.default_rng(0)
    (folder / "tensors").mkdir(parents=True)
    total = 0
    for name, shape in smollm2_shapes().items():
        path = folder / "tensors" / f"{name}.safetensors"
        save_file({name: rng.standard_normal(shape, dtype=np.float32).astype(np.float16)},
                  str(path))  # fmt: skip
        total += path.stat().st_size
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=ints, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    server = start_moto(port)
    endpoint = f"127.0.0.1:{port}"
    client = Minio(endpoint, access_key="testing", secret_key="testing", secure=False,
                   region="us-east-1")  # fmt: skip
    store = MinioStore(endpoint=endpoint, access_key="testing", secret_key="testing",
                       bucket="strata-tree", client=client, region="us-east-1")  # fmt: skip
    times: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="strata-tree-") as tmp:
            size = write_tree(Path(tmp) / "src")
            digest = put_tree(store, Path(tmp) / "src")
            files = read_manifest(store, digest)["files"]
            print(f"{len(files)} files, {size / MB:.0f} MiB")

            def raw(dest: Path) -> None:
                for rel, entry in files.items():
                    client.fget_object(store.bucket, blob_key(entry["digest"]), str(dest / rel))

            def strata(threads: int, dest: Path, *, tee: bool) -> None:
                trees.FETCH_THREADS = threads
                trees.get_tree(store, digest, dest, tee=(lambda rel, chunk: None) if tee else None)

            runs: list[tuple[str, Callable[[Path], None]]] = [("raw, one file at a time", raw)]
            for n in args.threads:
                runs.append((f"get_tree, {n} at a time", partial(strata, n, tee=False)))
                runs.append((f"get_tree with a tee (a cold download), {n} at a time",
                             partial(strata, n, tee=True)))  # fmt: skip
            for round_ in range(args.repeats):
                for name, fn in runs if round_ % 2 == 0 else runs[::-1]:
                    dest = Path(tmp) / "dest"
                    start = time.perf_counter()
                    fn(dest)
                    times.setdefault(name, []).append(time.perf_counter() - start)
                    shutil.rmtree(dest)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print("\n| fetch | median s | MB/s |\n|---|---|---|")
    for name, runs_ in times.items():
        median = statistics.median(runs_)
        print(f"| {name} | {median:.2f} | {size / MB / median:.0f} |")


if __name__ == "__main__":
    main()
