"""Training data from object storage: shards, deterministic elastic order, exact resume.

* :func:`write_shards` / :class:`ShardWriter`: samples -> shards + index.json at any fsspec URL.
* :class:`Stream`: random access to a sharded dataset, with a bounded node-local cache; it reads
  through a :class:`Source` (trainkit's shards, Parquet row groups, Arrow record batches as
  Hugging Face ``save_to_disk`` writes them, WebDataset tars with an index, mosaic MDS shards).
* :class:`Loader`: this rank's micro-batches, resumable exactly from ``state_dict()``.

See docs/data.md.
"""

from trainkit.data.loader import Loader, default_collate
from trainkit.data.source import Source, TrainkitSource, open_source, read_index
from trainkit.data.stream import Stream
from trainkit.data.writer import ShardWriter, folder_samples, write_shards

__all__ = ["Loader", "ShardWriter", "Source", "Stream", "TrainkitSource", "default_collate", "folder_samples",
           "open_source", "read_index", "write_shards"]
