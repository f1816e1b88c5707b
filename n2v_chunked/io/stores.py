"""Object stores: storage options, secret redaction, store errors and retries.

Remote data goes through obstore (:mod:`n2v_chunked.io.objects`: ``s3://``
and read-only ``http(s)://``).  Credentials and endpoints come the way AWS
tools take them (``AWS_*`` environment variables, ``AWS_ENDPOINT_URL``, the
static settings of a profile in ``~/.aws/config`` and ``credentials``), plus
``--storage-options KEY=VALUE`` / a YAML ``storage_options:`` section.
:func:`~n2v_chunked.io.objects.configure` makes those options the process's defaults and exports them
(``N2V_STORAGE_OPTIONS``) to the worker processes started afterwards, so every
store the run opens, here or in a dask worker, sees them without each
function carrying them.

A secret (``secret``, ``token``, ``password``, ... option values, the
``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` of the environment, a
password in a URL) never reaches a log line, an error message, an output's
provenance or a model's config: :func:`redact` scrubs text, and
:class:`RedactingFilter` scrubs every log record.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from ..errors import ConfigError, N2VError, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")

OPTIONS_ENV = "N2V_STORAGE_OPTIONS"  # the options of objects.configure(), for worker processes
SECRET_KEYS = ("secret", "token", "password", "passwd", "credential", "signature", "sas", "auth")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Transient failures worth another try: timeouts, dropped connections, HTTP 5xx, throttling.
TRANSIENT_TEXT = re.compile(
    r"\b(50[0234]|429)\b|SlowDown|Throttl|ServiceUnavailable|Service Unavailable|InternalError|RequestTimeout|"
    r"timed? ?out|Connection (reset|aborted|closed)|ServerDisconnected|Too Many Requests",
    re.IGNORECASE,
)
_STATUS = re.compile(r"status code: (\d{3}[^:]*)")  # in obstore's errors
_S3_ERROR = re.compile(r"<Code>([^<]*)</Code>\s*<Message>([^<]*)</Message>")
REMOTE_IO_THREADS = 8  # sampler reader threads for a remote source (2 for local disk)
REMOTE_READ_AHEAD = 2  # a local prediction from a URL runs 2x as many dask tasks as cores (torch threads unchanged)
REMOTE_ZARR_CONCURRENCY = 64  # zarr's async.concurrency (chunk requests in flight per read) for remote runs
RETRIES = 5  # attempts per block operation after the first
BACKOFF_S = 0.5  # first wait; doubled per attempt, capped at BACKOFF_MAX_S
BACKOFF_MAX_S = 8.0

_secrets: set[str] = set()


class RetriesExhausted(N2VError):
    """A transient store error that outlasted its retries (the run stops; the output stays resumable)."""


# ----------------------------------------------------------------------------
# URLs and storage options.
# ----------------------------------------------------------------------------


OBJECT_PROTOCOLS = ("s3", "s3a", "http", "https")  # the URL schemes obstore serves


def protocol(url: str) -> str | None:
    """The scheme of a URL (``s3``, ``https``, ...), or None for a local path."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    return m.group(1).lower() if m and m.group(1).lower() != "file" else None


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_storage_options(items: Iterable[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (or a YAML mapping) as fsspec options.

    Dotted keys nest (``client_kwargs.region_name=eu-west-1``); ``true``/``false``
    and numbers are converted.

    Parameters
    ----------
    items : iterable of str, dict or None
        From ``--storage-options`` (repeatable) or a YAML ``storage_options:`` mapping.

    Returns
    -------
    dict
        Options for the file system's constructor.
    """
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            key, sep, val = str(item).partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--storage-options expects KEY=VALUE, got {_scrub_item(str(item))!r}")
            pairs.append((key.strip(), _value(val)))
    out: dict[str, Any] = {}
    for key, val in pairs:
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"storage option {key}: {p} is both a value and a section")
        node[leaf] = val
    return out


def _scrub_item(item: str) -> str:
    key, sep, _ = item.partition("=")
    return f"{key}=***" if sep and _is_secret_key(key) else item


def _is_secret_key(key: str) -> bool:
    low = key.lower()
    return any(s in low for s in SECRET_KEYS) or low in ("key", "access_key", "aws_secret_access_key")


def _secret_values(options: Any) -> Iterable[str]:
    if isinstance(options, dict):
        for k, v in options.items():
            if isinstance(v, dict):
                yield from _secret_values(v)
            elif v and _is_secret_key(str(k)) and isinstance(v, str):
                yield v


def remember_secrets(options: dict[str, Any] | None = None) -> None:
    """Note the secrets of ``options`` and of the environment, for :func:`redact`."""
    _secrets.update(s for s in _secret_values(options or {}) if len(s) >= 4)
    _secrets.update(os.environ[k] for k in SECRET_ENV if len(os.environ.get(k, "")) >= 4)


def storage_options() -> dict[str, Any]:
    """The options :func:`~n2v_chunked.io.objects.configure` set (in a worker process: those it inherited)."""
    raw = os.environ.get(OPTIONS_ENV)
    return json.loads(raw) if raw else {}


def tune_for_latency() -> None:
    """Let zarr keep more chunk requests in flight per read (its default, 10, suits local disks)."""
    import zarr

    if int(zarr.config.get("async.concurrency") or 0) < REMOTE_ZARR_CONCURRENCY:
        zarr.config.set({"async.concurrency": REMOTE_ZARR_CONCURRENCY})
        os.environ.setdefault("ZARR_ASYNC__CONCURRENCY", str(REMOTE_ZARR_CONCURRENCY))  # dask worker processes


def check_writable(url: str) -> None:
    """Refuse an output on a read-only kind of store (``http(s)://``) before anything runs."""
    if protocol(url) in ("http", "https"):
        raise ConfigError(f"cannot write {redact(url)}: http(s) URLs are read-only; write to a local path or s3://")


def require_client(url: str) -> None:
    """One line naming the extra to install when obstore, the client of object-store URLs, is missing."""
    proto = protocol(url)
    if proto not in OBJECT_PROTOCOLS:
        return
    try:
        import obstore  # noqa: F401
    except ImportError:
        raise N2VError(
            f"reading or writing {proto}:// needs the obstore package: pip install 'n2v-chunked[s3]'"
        ) from None


# ----------------------------------------------------------------------------
# Paths, URLs and chunks.
# ----------------------------------------------------------------------------

ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")


def is_url(s: str) -> bool:
    """True for ``scheme://...`` strings (fsspec URLs)."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s))


def local_path(path: str | os.PathLike[str]) -> Path | None:
    """The absolute local path of ``path`` (``file://`` stripped), or None for an object-store URL."""
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return None if is_url(s) else Path(s).expanduser().absolute()


def location(path: str | os.PathLike[str]) -> str:
    """``path`` as the store location zarr and fsspec use: absolute for local paths, URLs unchanged."""
    loc = local_path(path)
    return str(loc) if loc is not None else str(path)


def grow_chunks(shape: Sequence[int], chunks: Sequence[int], itemsize: int, target: int) -> tuple[int, ...]:
    """Multiply store chunks, innermost dim first, until a chunk is about ``target`` bytes."""
    out = [min(c, s) for c, s in zip(chunks, shape)]
    for d in reversed(range(len(out))):
        size = math.prod(out) * itemsize
        if size >= target:
            break
        factor = max(1, target // size)
        out[d] = min(shape[d], out[d] * factor)
    return tuple(out)


# ----------------------------------------------------------------------------
# Redaction.
# ----------------------------------------------------------------------------


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|sig|signature|token)=)[^&\s]+")


def redact(text: str) -> str:
    """``text`` with every known secret, URL password and signed-URL signature replaced by ``***``."""
    if not text:
        return text
    for s in sorted(_secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    return _QUERY_SECRET.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """Scrubs secrets from every record (installed on the root logger's handlers by the CLI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets or "://" in str(record.msg) or record.args:
            msg = record.getMessage()
            clean = redact(msg)
            if clean != msg:
                record.msg, record.args = clean, None
        return True


def install_log_redaction() -> None:
    """Add :class:`RedactingFilter` to every handler of the root logger (once)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# ----------------------------------------------------------------------------
# Store errors: what the user did wrong, in one line; transient ones retried.
# ----------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


def store_problem(exc: BaseException, url: str) -> str | None:
    """A one-line description of a user-fixable store error (bucket, credentials, permission), else None."""
    chain = list(_chain(exc))
    codes = {_code(e) for e in chain}
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    if "NoSuchBucket" in codes or "bucket does not exist" in text:
        return f"{url}: the bucket does not exist (check the name, the region and AWS_ENDPOINT_URL)"
    if codes & {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken"} or any(
        w in text for w in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "signature we calculated does not match",
                            "security token", "AWS Access Key Id")
    ):
        return (f"{url}: the store refused the credentials (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "the profile or --storage-options key=/secret=)")
    if "NoCredentialsError" in text or "Unable to locate credentials" in text:
        return (f"{url}: no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile; "
                "for a public bucket pass --storage-options anon=true)")
    if "AccessDenied" in codes or any(isinstance(e, PermissionError) for e in chain) or "Access Denied" in text:
        return f"{url}: access denied (the credentials may not read or write there)"
    return None


def summary(exc: BaseException) -> str:
    """A store error in one line; an HTTP one in a few words (``HTTP 403 Forbidden: AccessDenied: Access Denied``)."""
    text = str(exc)
    status, s3 = _STATUS.search(text), _S3_ERROR.search(text)
    parts = ([f"HTTP {status.group(1).strip()}"] if status else []) + ([f"{s3.group(1)}: {s3.group(2)}"] if s3 else [])
    return redact(": ".join(parts) if parts else first_line(exc)[:300])


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a timeout, a dropped connection, HTTP 5xx or throttling."""
    for e in _chain(exc):
        if isinstance(e, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
            return True
        name = type(e).__name__
        if name in ("ServerDisconnectedError", "ClientPayloadError", "ClientOSError", "EndpointConnectionError",
                    "ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError", "ResponseStreamingError"):
            return True
        status = getattr(e, "status", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if _code(e) in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"):
            return True
        if isinstance(e, OSError) and e.errno in (errno.EIO, errno.EAGAIN, errno.EBUSY) and TRANSIENT_TEXT.search(str(e)):
            return True
        store_error = isinstance(e, (OSError, RuntimeError)) or type(e).__module__.startswith("obstore")
        if store_error and TRANSIENT_TEXT.search(str(e)) and not isinstance(e, (FileNotFoundError, PermissionError)):
            return True
    return False


def with_retries(fn: Callable[[], T], what: str, retries: int | None = None) -> T:
    """Call ``fn``; retry transient store errors with exponential back-off, a bounded number of times.

    Each retry is logged as a warning; when the last one fails the error is
    raised as :class:`N2VError` naming ``what`` and the number of attempts.

    Parameters
    ----------
    fn : callable
        The operation (one block's read or write).
    what : str
        What it does, for the messages (``"block (0, 1): write s3://b/out.zarr"``).
    retries : int, optional
        Attempts after the first (default :data:`RETRIES`).
    """
    retries = RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if isinstance(exc, RetriesExhausted) or not is_transient(exc):
                raise
            first = summary(exc)
            if attempt == retries:
                raise RetriesExhausted(f"{what}: still failing after {retries + 1} attempts: {type(exc).__name__}: {first}") from exc
            wait = min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S)
            log.warning("%s: transient error (%s: %s); retry %d of %d in %.1f s", what, type(exc).__name__, first,
                        attempt + 1, retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
