"""trainkit: train PyTorch models on rented and preemptible compute.

``Run`` carries the distributed context for a loop of your own; ``python -m trainkit.launch``
runs the Hydra recipes locally or on Ray. See README.md and docs/.
"""

from trainkit.config import Config, load_config
from trainkit.errors import ConfigError, Preempted, StorageError, TrainkitError
from trainkit.run import Run

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Preempted", "Run", "StorageError", "TrainkitError", "load_config"]
