"""Object stores through obstore: ``s3://`` and ``http(s)://`` as zarr stores and as objects.

One client layer serves an object-store URL: obstore (Rust, one HTTP client
per bucket or host, cached per process).  Zarr reads and writes chunks through
``zarr.storage.ObjectStore`` (:func:`zarr_store`); the writer's resume markers,
the lock and the output checks use the few object operations below
(:func:`exists`, :func:`listdir`, :func:`read`, :func:`write` with a
conditional create, :func:`remove`, :func:`remove_tree`).  Local paths (and
other fsspec URLs, e.g. ``memory://`` in tests) take the same calls through
fsspec's file system.

Credentials and endpoint, first found wins: storage options
(:func:`configure`, or per call), the ``AWS_*``
environment variables (read by obstore), then the profile (``AWS_PROFILE`` or
``profile=``) in ``~/.aws/credentials`` and ``~/.aws/config`` (static keys,
region, ``endpoint_url``).  Options use short names (``key``, ``secret``,
``token``, ``endpoint_url``, ``region``, ``anon``, ``profile``); any other
key is obstore's own (``S3Config``; ``client_options.*``, ``retry_config.*``).

The client retries a failed request :data:`CLIENT_RETRIES` times within
about a second; a fault that outlasts that reaches the per-block retries of
:func:`~n2v_chunked.io.stores.with_retries`, which back off longer and report
each retry.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime
import errno
import json
import os
import threading
from typing import Any, Iterator, Sequence

from ..errors import ConfigError
from .stores import (
    OBJECT_PROTOCOLS, OPTIONS_ENV, location, protocol, redact, remember_secrets, require_client, storage_options,
    store_problem, summary, tune_for_latency,
)

CLIENT_RETRIES = 2  # per request, inside obstore; then with_retries takes over, per block
CLIENT_BACKOFF = {"init_backoff": datetime.timedelta(milliseconds=100), "max_backoff": datetime.timedelta(seconds=1),
                  "base": 2.0}
# Short option names (fsspec's, also in --storage-options help) -> obstore's S3 configuration keys.
ALIASES = {"key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
           "endpoint_url": "endpoint", "anon": "skip_signature"}
PROFILE_KEYS = {"aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
                "aws_session_token": "session_token", "region": "region", "endpoint_url": "endpoint"}
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT",
           "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
           "AWS_SKIP_SIGNATURE")

_ERRNO = {FileNotFoundError: errno.ENOENT, PermissionError: errno.EACCES, FileExistsError: errno.EEXIST}

_clients: dict[tuple, Any] = {}
_saved: list[str | None] = []  # the OPTIONS_ENV values configure() replaced
_clients_lock = threading.Lock()


_AS_BUILTIN = {"NotFoundError": FileNotFoundError, "PermissionDeniedError": PermissionError,
               "UnauthenticatedError": PermissionError, "AlreadyExistsError": FileExistsError,
               "PreconditionError": FileExistsError}


def is_object_url(path: str) -> bool:
    """Whether ``path`` is served by obstore (``s3://``, ``http(s)://``)."""
    return protocol(str(path)) in OBJECT_PROTOCOLS


def is_store_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a store's: an ``OSError`` or any obstore error."""
    return isinstance(exc, OSError) or type(exc).__module__.startswith("obstore")


@contextlib.contextmanager
def _builtin_errors(path: str) -> Iterator[None]:
    """An obstore call's errors as the built-in ones callers handle (``FileNotFoundError``, ...), in one line.

    obstore raises its own classes, and for some operations built-in ones, with
    the server's whole answer and a debug dump in the message.
    """
    try:
        yield
    except Exception as exc:
        kind = next((k for k in (FileNotFoundError, PermissionError, FileExistsError) if isinstance(exc, k)),
                    _AS_BUILTIN.get(type(exc).__name__, OSError))
        raise kind(_ERRNO.get(kind, errno.EIO), summary(exc), redact(path)) from exc


# ----------------------------------------------------------------------------
# Clients: one per bucket (or host) and configuration, per process.
# ----------------------------------------------------------------------------


def root_and_key(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket or scheme://host, key)`` of an object URL."""
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    root, _, key = rest.partition("/")
    return scheme, root if scheme in ("s3", "s3a") else f"{scheme}://{root}", key.strip("/")


def _profile(name: str) -> dict[str, str]:
    """The static settings of an AWS profile (``~/.aws/config`` then ``~/.aws/credentials``)."""
    home = os.path.expanduser("~/.aws")
    sources = ((os.environ.get("AWS_CONFIG_FILE") or f"{home}/config", "default" if name == "default" else f"profile {name}"),
               (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or f"{home}/credentials", name))
    out: dict[str, str] = {}
    for path, section in sources:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_section(section):
            out.update({PROFILE_KEYS[k]: v for k, v in parser.items(section) if k in PROFILE_KEYS})
    return out


def s3_config(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """obstore's S3 configuration, client options and retry configuration for ``options``.

    The profile fills what neither the options nor the environment give.
    """
    config = {ALIASES.get(k, k): v for k, v in options.items() if k not in ("client_options", "retry_config", "profile")}
    if config.get("skip_signature"):
        config["skip_signature"] = True
    profile = _profile(str(options.get("profile") or os.environ.get("AWS_PROFILE") or "default"))
    env = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
           "session_token": "AWS_SESSION_TOKEN", "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
           "endpoint": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT")}
    keys_given = "access_key_id" in config or "AWS_ACCESS_KEY_ID" in os.environ or config.get("skip_signature")
    for key, value in profile.items():
        names = env[key] if isinstance(env[key], tuple) else (env[key],)
        credential = key in ("access_key_id", "secret_access_key", "session_token")
        if key not in config and not any(n in os.environ for n in names) and not (credential and keys_given):
            config[key] = value
    endpoint = str(config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or "")
    client = {"allow_http": endpoint.startswith("http://"), **options.get("client_options", {})}
    retry = {"max_retries": CLIENT_RETRIES, "backoff": CLIENT_BACKOFF, "retry_timeout": datetime.timedelta(seconds=10),
             **options.get("retry_config", {})}
    return config, client, retry


def client(url: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The obstore store of ``url``'s bucket (or host), cached per process, and the key of ``url`` in it."""
    require_client(url)
    import obstore.store

    scheme, root, key = root_and_key(url)
    opts = {**storage_options(), **(options or {})}
    ident = (scheme, root, json.dumps(opts, sort_keys=True, default=str), tuple(os.environ.get(k) for k in AWS_ENV))
    with _clients_lock:
        store = _clients.get(ident)
        if store is None:
            store = _clients[ident] = _make(scheme, root, opts, obstore.store)
    return store, key


def _make(scheme: str, root: str, opts: dict[str, Any], module: Any) -> Any:
    try:
        if scheme in ("s3", "s3a"):
            config, client_options, retry = s3_config(opts)
            return module.S3Store(root, client_options=client_options, retry_config=retry, **config)
        retry = {"max_retries": CLIENT_RETRIES, "backoff": CLIENT_BACKOFF, **opts.get("retry_config", {})}
        client_options = {"allow_http": scheme == "http", **opts.get("client_options", {})}
        return module.HTTPStore.from_url(root, client_options=client_options, retry_config=retry)
    except Exception as exc:  # obstore's configuration errors: an unknown option, a bad value
        raise ConfigError(f"{redact(root)}: bad storage options: {redact(str(exc).splitlines()[0])}") from None


def forget_clients() -> None:
    """Drop the cached clients (after the options change)."""
    with _clients_lock:
        _clients.clear()


def configure(options: dict[str, Any], urls: Sequence[str] = ()) -> None:
    """Make ``options`` the defaults of every object store of this process and of workers started later.

    Parameters
    ----------
    options : dict
        From :func:`parse_storage_options`.
    urls : sequence of str
        The run's inputs and outputs (a remote one tunes zarr for latency).
    """
    remember_secrets(options)
    if any(protocol(str(u)) for u in urls):
        tune_for_latency()
    if not options:
        return
    _saved.append(os.environ.get(OPTIONS_ENV))
    os.environ[OPTIONS_ENV] = json.dumps({**storage_options(), **options})
    forget_clients()


def unconfigure() -> None:
    """Undo :func:`configure` (the CLI does at exit, so in-process callers and tests start clean)."""
    while _saved:
        value = _saved.pop()
        if value is None:
            os.environ.pop(OPTIONS_ENV, None)
        else:
            os.environ[OPTIONS_ENV] = value
    forget_clients()


def diagnose(url: str, exc: BaseException) -> str | None:
    """Why opening ``url`` failed, when the bucket or the credentials are to blame (probes the bucket)."""
    problem = store_problem(exc, url)
    if protocol(url) not in ("s3", "s3a") or (problem is not None and "access denied" not in problem):
        return problem
    scheme, bucket, _ = root_and_key(url)
    try:  # the bucket listing tells a missing bucket and refused credentials apart from a mere denial
        listdir(f"{scheme}://{bucket}", limit=1)
    except Exception as probe:  # noqa: BLE001 - only used to explain the first error
        return store_problem(probe, url) or problem
    return problem


# ----------------------------------------------------------------------------
# Zarr stores and object operations.
# ----------------------------------------------------------------------------


def zarr_store(path: str, read_only: bool = False, options: dict[str, Any] | None = None) -> Any:
    """What zarr opens for ``path``: an ``ObjectStore`` path for an object URL, else the location itself."""
    if not is_object_url(path):
        return location(path)
    from zarr.storage import ObjectStore, StorePath

    store, key = client(str(path), options)
    return StorePath(ObjectStore(store, read_only=read_only), key)


def _fs(path: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(location(path))


def read(path: str, options: dict[str, Any] | None = None) -> bytes | None:
    """The object's bytes, or None when there is none."""
    if not is_object_url(path):
        fs, p = _fs(path)
        try:
            return fs.cat_file(p)
        except FileNotFoundError:
            return None
    import obstore

    store, key = client(path, options)
    try:
        with _builtin_errors(path):
            return bytes(obstore.get(store, key).bytes())
    except FileNotFoundError:
        return None


def write(path: str, data: bytes, create: bool = False, options: dict[str, Any] | None = None) -> bool:
    """Store ``data`` at ``path``; with ``create``, only if nothing is there (False if something was).

    On an object store the create is one conditional request (``If-None-Match:
    *``): of two runs that race, exactly one wins.
    """
    if not is_object_url(path):
        fs, p = _fs(path)
        if create and fs.exists(p):
            return False
        fs.pipe_file(p, data)
        return True
    import obstore

    store, key = client(path, options)
    try:
        with _builtin_errors(path):
            obstore.put(store, key, data, mode="create" if create else "overwrite")
    except FileExistsError:
        return False
    return True


def exists(path: str, options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is an object or a non-empty prefix ("folder")."""
    if not is_object_url(path):
        fs, p = _fs(path)
        return fs.exists(p)
    return is_file(path, options) or bool(listdir(path, 1, options))


def is_file(path: str, options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is an object (not merely a prefix)."""
    if not is_object_url(path):
        fs, p = _fs(path)
        return fs.isfile(p)
    import obstore

    store, key = client(path, options)
    try:
        with _builtin_errors(path):
            obstore.head(store, key)
    except FileNotFoundError:
        return False
    return True


def listdir(path: str, limit: int | None = None, options: dict[str, Any] | None = None) -> list[str]:
    """Names directly under the folder (or prefix) ``path``; empty when there is none."""
    if not is_object_url(path):
        fs, p = _fs(path)
        try:
            return [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)][:limit]
        except (FileNotFoundError, NotADirectoryError):
            return []
    import obstore

    store, key = client(path, options)
    with _builtin_errors(path):
        found = obstore.list_with_delimiter(store, f"{key}/" if key else None)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"]]
    names += [o["path"].rsplit("/", 1)[-1] for o in found["objects"]]
    return names[:limit]


def remove(path: str, options: dict[str, Any] | None = None) -> None:
    """Delete the object (or file) ``path``; nothing there is fine."""
    if not is_object_url(path):
        fs, p = _fs(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(p)
        return
    import obstore

    store, key = client(path, options)
    with contextlib.suppress(FileNotFoundError), _builtin_errors(path):
        obstore.delete(store, key)


def remove_tree(path: str, options: dict[str, Any] | None = None) -> None:
    """Delete everything under the folder (or prefix) ``path``."""
    if not is_object_url(path):
        fs, p = _fs(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(p, recursive=True)
        return
    import obstore

    store, key = client(path, options)
    with _builtin_errors(path):
        for batch in obstore.list(store, f"{key}/", chunk_size=1000):
            obstore.delete(store, [o["path"] for o in batch])
