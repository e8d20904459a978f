"""Credentials never land in a run: values of credential-like keys are hidden wherever a
config is written or shown (``config.yaml``, trackers, ``--cfg``, error lines).

The run itself keeps the real values (fsspec needs them); only the copies meant for people
and for shared buckets are redacted. Prefer environment variables or instance roles, which
never enter the config at all (docs/clusters.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

HIDDEN = "<redacted>"
# Whole key names (lower-cased, '-' as '_') and fragments that mark a credential.
_EXACT = frozenset({"key", "secret", "token", "password", "passwd", "pwd", "credentials", "credential",
                    "connection_string", "account_key", "sas_token", "access_key", "secret_key",
                    "session_token", "api_key", "apikey", "private_key", "client_secret", "auth",
                    "authorization", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                    "security_token", "refresh_token", "access_token"})
# Whole words of a snake_case key (so ``sas_token`` is hidden and ``max_tokens`` is not).
_WORDS = frozenset({"secret", "secrets", "password", "passwd", "token", "credential", "credentials", "sas"})
_SUFFIXES = ("account_key", "api_key", "private_key", "access_key", "secret_key", "connection_string")


def is_credential(key: str) -> bool:
    k = str(key).lower().replace("-", "_")
    return k in _EXACT or bool(_WORDS & set(k.split("_"))) or k.endswith(_SUFFIXES)


def redact(data: Any) -> Any:
    """A copy of ``data`` (mappings and lists, nested) with credential values hidden."""
    if isinstance(data, Mapping):
        return {k: (HIDDEN if is_credential(k) and v not in (None, "") else redact(v)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    return data


def secrets(data: Any) -> list[str]:
    """The credential values in ``data`` (to scrub from free text such as error messages)."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for k, v in data.items():
            if is_credential(k) and isinstance(v, (str, int)) and str(v):
                found.append(str(v))
            else:
                found.extend(secrets(v))
    elif isinstance(data, (list, tuple)):
        for v in data:
            found.extend(secrets(v))
    return found


def scrub(text: str, values: Iterable[str]) -> str:
    """``text`` with every one of ``values`` replaced (longest first, so no part is left)."""
    for value in sorted(set(values), key=len, reverse=True):
        if len(value) >= 4:
            text = re.sub(re.escape(value), HIDDEN, text)
    return text
