from __future__ import annotations

import uuid

import pytest

from trainkit import storage
from trainkit.data import write_shards

from data_helpers import make_samples  # noqa: E402  (tests/data is on sys.path under pytest)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """file:// dataset: 240 samples in ~12 shards."""
    url = "file://" + str(tmp_path_factory.mktemp("ds") / "small")
    write_shards(make_samples(240), url, shard_bytes=2500, workers=4)
    return url


@pytest.fixture
def memory_url():
    return f"memory://trainkit-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def storage_options():
    """Sets trainkit.storage per-protocol options for one test; restores them after."""
    saved = storage.configured()

    def set_(options):
        storage.configure({**saved, **options})

    yield set_
    storage.configure(saved)
