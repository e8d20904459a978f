"""Test-side names for the loopback servers (implementation lives in trainkit.testing)."""

from trainkit.testing.faultproxy import FaultProxy, every, fail_first
from trainkit.testing.servers import GCSServer, S3Server, free_port

__all__ = ["FaultProxy", "GCSServer", "S3Server", "every", "fail_first", "free_port"]
