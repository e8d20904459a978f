"""``python -m trainkit.tasks write RECIPE URL [key=value ...]``: a recipe's data set to any store.

Writes the shards the recipe would prepare in the embedded store to ``URL/train`` and
``URL/eval`` instead (``s3://``, ``gs://``, any fsspec URL), so a run can read them with
``data.url=URL/train``. Overrides are the launcher's (``model.image_size=32``,
``storage.s3.endpoint_url=...``).
"""

from __future__ import annotations

import sys

from trainkit import storage
from trainkit.errors import TrainkitError


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "write":
        print("usage: python -m trainkit.tasks write RECIPE URL [key=value ...]", file=sys.stderr)
        return 2
    from trainkit.launch.compose import compose_config
    from trainkit.tasks import TASKS
    from trainkit.tasks.base import write_data

    try:
        cfg = compose_config([f"recipe={argv[1]}", *argv[3:]])
        storage.configure(cfg.storage)
        for url in write_data(TASKS.get(cfg.task, "task"), cfg.model, argv[2]):
            print(url)
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
