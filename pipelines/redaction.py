"""Keep credentials out of what vaepipe writes down: run params and tags, config.yaml artifacts, console output,
error messages and Ray job submissions.

    redact_text("postgresql://bob:pw@db/mlflow")          # 'postgresql://****@db/mlflow'
    redact_value("aws.secret_access_key", "abc")           # '****'
    split_credentials("http://alice:pw@host:5055")         # ('http://host:5055', 'alice', 'pw')

Two rules, applied everywhere: the user-info part of any URI (`scheme://USER:PASSWORD@host`) is masked, and the
value of any key that names a secret (password, secret, token, api key, access key, private key, credential) is
masked whole.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "****"
# `scheme://userinfo@`: userinfo ends at the last '@' before the host, never crosses '/', '?', '#' or whitespace.
_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s@]+(?:@[^/?#\s@]+)*)@")
_SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth[_-]?key",
    re.IGNORECASE,
)


# `?key=value` / `&key=value` whose key names a credential: presigned URLs (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token), SAS tokens (sig=), `token=`, `password=`.
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[^=&;#\s]*?)(?:sig|signature|token|credential|pass(?:word|wd)?|secret|api[_-]?key)"
    r"[^=&;#\s]*=)[^&;#\s]+",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """`text` with the user-info of every URI in it, and query values whose keys name credentials, masked (an
    entrypoint, a message, a log line)."""
    text = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def is_secret_key(key: str) -> bool:
    """Whether a key (`a.b.c`, an environment variable name, a tag) names a secret, judged by its last part."""
    last = re.split(r"[.:/]", str(key))[-1]
    return bool(_SECRET_KEY.search(last))


def redact_value(key: str, value: Any) -> Any:
    """The value as it may be written down under `key`: masked whole for a secret key, URIs' user-info masked in
    strings, nested dicts and lists redacted item by item."""
    if isinstance(value, dict):
        return {k: redact_value(f"{key}.{k}" if key else str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(key, v) for v in value)
    if is_secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_mapping(data: dict) -> dict:
    """A nested dict (a config's `to_dict()`, params, tags) with every value passed through `redact_value`."""
    return {k: redact_value(str(k), v) for k, v in data.items()}


def has_credentials(key: str, value: Any) -> bool:
    """Whether writing `key: value` down would leak something (what `redact_value` would change)."""
    return redact_value(key, value) != value


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(`uri` without its user-info, user, password); user and password are None when the URI carries none.

    For http(s) MLflow servers, which take credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    rather than from the URI."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri, None, None
    if parts.username is None and parts.password is None:
        return uri, None, None
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return clean, user, password
