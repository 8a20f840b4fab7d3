"""Redis URLs: how every reelrank component is told where the online store is.

One form everywhere, redis-py's: ``redis://[[username]:password@]host[:port][/db]``,
``rediss://`` for TLS and ``unix:///path/to/socket[?db=N]`` for a local socket. Special
characters in a password are percent-encoded. ``REDIS_URL`` supplies it when no URL is given.
Anything shown to people goes through :func:`redact`, which hides the password.
"""

from __future__ import annotations

import os
from urllib.parse import SplitResult, parse_qs, urlsplit

from training.errors import ReelrankError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_ENV = "REDIS_URL"
SCHEMES = ("redis", "rediss", "unix")


class RedisUrlError(ReelrankError):
    """A Redis URL that cannot be used; the message shows it without its password."""


def resolve(url: str | None = None) -> str:
    """``url``, else ``$REDIS_URL``, else the default; checked with :func:`validate`."""
    if not url:
        url = os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
    return validate(url)


def validate(url: str) -> str:
    """Return ``url`` unchanged if it is a usable Redis URL, else raise :class:`RedisUrlError`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise RedisUrlError(f"Redis URL {redact(url)!r} is malformed: {error}") from None

    if parts.scheme not in SCHEMES:
        raise RedisUrlError(
            f"Redis URL {redact(url)!r} must start with redis://, rediss:// (TLS) or unix://"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise RedisUrlError(f"Redis URL {redact(url)!r} names no host")
    if parts.scheme == "unix" and not parts.path:
        raise RedisUrlError(f"Redis URL {redact(url)!r} names no socket path")
    if port == 0:
        raise RedisUrlError(f"Redis URL {redact(url)!r} has port 0")

    db = _database(parts)
    if db is None or db < 0:
        raise RedisUrlError(
            f"Redis URL {redact(url)!r}: the database must be a number >= 0, as in /0"
        )
    return url


def database(url: str) -> int:
    """The logical database number a valid URL selects (0 when it names none)."""
    return _database(urlsplit(url)) or 0


def _database(parts: SplitResult) -> int | None:
    query = parse_qs(parts.query).get("db")
    if query:
        text = query[0]
    elif parts.scheme == "unix":
        text = "0"
    else:
        text = parts.path.lstrip("/") or "0"
    try:
        return int(text)
    except ValueError:
        return None


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``; safe to log and print."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<malformed Redis URL>"
    if password is None:
        return url

    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
