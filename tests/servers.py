"""Test-side names for the loopback servers (implementation lives in trainkit.testing)."""

from trainkit.testing.faultproxy import FaultProxy, every, fail_first
from trainkit.distributed import free_port
from trainkit.testing.servers import GCSServer, S3Server

__all__ = ["FaultProxy", "GCSServer", "S3Server", "every", "fail_first", "free_port"]
