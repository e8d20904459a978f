"""Loopback store servers and a fault-injecting proxy, for tests and ``trainkit.bench``."""

from trainkit.testing.faultproxy import FaultProxy, every, fail_first
from trainkit.testing.servers import GCSServer, S3Server

__all__ = ["FaultProxy", "GCSServer", "S3Server", "every", "fail_first"]
