"""Peak memory of a reader does not grow with the dataset: one ten times larger than the
cache reads within the same peak as one the size of the cache, plus a stated constant."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from trainkit.data import write_shards

READ = """
import json, resource, sys
from trainkit import storage
from trainkit.data import Loader, Stream
storage.configure({"s3": json.loads(sys.argv[3])})
stream = Stream(sys.argv[1], cache_dir=sys.argv[2], cache_bytes=4 << 20, shuffle_window=2, prefetch=2)
it = iter(Loader(stream, batch_size=64, rank=0, world_size=1))
seen = 0
while seen < 2 * len(stream):  # two epochs
    seen += len(next(it)["x"])
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "fetches": stream.cache.stats["fetches"]}))
"""

CONSTANT_KIB = 24 << 10  # allocator and import noise between two runs of the same reader


def _samples(n: int):
    for i in range(n):
        yield {"x": np.full(4096, i % 251, dtype=np.uint8), "id": i}


def test_peak_memory_does_not_grow_with_the_dataset(s3_url, s3_server, tmp_path):
    peaks = {}
    for name, n in (("1x", 1000), ("10x", 10_000)):  # 4 MB and 40 MB against a 4 MB cache
        url = f"{s3_url}/{name}"
        write_shards(_samples(n), url, shard_bytes=400 << 10)
        r = subprocess.run([sys.executable, "-c", READ, url, str(tmp_path / name), json.dumps(s3_server.storage_options)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert peaks["10x"]["fetches"] >= 10 * peaks["1x"]["fetches"] / 2  # it really streamed 10x the bytes
    assert peaks["10x"]["peak_kib"] <= peaks["1x"]["peak_kib"] + CONSTANT_KIB, peaks
