"""Loopback store servers and a fault-injecting proxy, for tests and ``trainkit.bench``."""

from trainkit.testing.faultproxy import FaultProxy, every, fail_first
from trainkit.testing.servers import AzuriteServer, GCSServer, S3Server

__all__ = ["AzuriteServer", "FaultProxy", "GCSServer", "S3Server", "every", "fail_first"]
