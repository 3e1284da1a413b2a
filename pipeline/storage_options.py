"""Object-store options: parsed from the command line, mapped between fsspec and deltalake.

Two libraries reach the same store with different option names. Artifacts, run records and
stage logs go through fsspec (``s3fs`` for ``s3://``; keyword arguments such as
``endpoint_url``, ``key``, ``secret``, ``anon``); Delta tables go through deltalake's Rust
object store (keys such as ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_ALLOW_HTTP``).
A run takes ONE options mapping in either or both spellings, and :func:`fsspec_options` and
:func:`delta_options` give each library its own:

* a key that starts with ``aws_``, ``azure_``, ``google_`` or ``delta_`` (any case) is a
  deltalake key; every other key is an fsspec keyword argument (dotted keys nest:
  ``client_kwargs.region_name``);
* for ``s3://`` URLs the pairs of :data:`S3_KEYS` are translated both ways, so
  ``endpoint_url=…`` reaches deltalake as ``AWS_ENDPOINT_URL`` and ``AWS_ACCESS_KEY_ID=…``
  reaches s3fs as ``key``; an explicit key of the other spelling wins;
* the standard environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``,
  ``AWS_PROFILE``) are read by both libraries themselves. The one gap: deltalake refuses a
  plain-``http://`` endpoint unless ``AWS_ALLOW_HTTP`` is true, so it is set for an
  ``http://`` endpoint, whether it came from the options or the environment.

Local paths get no deltalake options (:func:`delta_options` returns ``None``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.errors import ConfigError

#: ``(fsspec key, deltalake key)`` pairs with the same meaning on ``s3://`` URLs.
S3_KEYS: tuple[tuple[str, str], ...] = (
    ("endpoint_url", "AWS_ENDPOINT_URL"),
    ("key", "AWS_ACCESS_KEY_ID"),
    ("secret", "AWS_SECRET_ACCESS_KEY"),
    ("token", "AWS_SESSION_TOKEN"),
    ("client_kwargs.region_name", "AWS_REGION"),
    ("anon", "AWS_SKIP_SIGNATURE"),
)
#: Environment variables holding the S3 endpoint, most specific first (botocore's order).
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_S3_PROTOCOLS = ("s3", "s3a")
_DELTA_KEY = re.compile(r"(aws|azure|google|delta)_\w+", re.IGNORECASE)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def protocol_of(url: str) -> str:
    """The URL's scheme (``"s3"``, ``"gs"``, ...), or ``"file"`` for a local path."""
    scheme, sep, _ = str(url).partition("://")
    return scheme.lower() if sep else "file"


def is_remote(url: str) -> bool:
    """True for a URL that is not on the local disk (``file://`` and plain paths are local)."""
    return protocol_of(url) != "file"


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the ``--storage-option`` flag) as an options mapping.

    ``true``/``false`` (any case) become booleans; every other value stays a string. A
    dotted key nests: ``client_kwargs.region_name=eu-west-1`` gives
    ``{"client_kwargs": {"region_name": "eu-west-1"}}``.

    Raises:
        ConfigError: an item without ``=``, or a key that is not a dotted identifier.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep:  # the item is not echoed: it may be a secret given without its key
            raise ConfigError("--storage-option expects KEY=VALUE; an item has no '='")
        if not _KEY.fullmatch(key):
            raise ConfigError(f"--storage-option: {key!r} is not a (dotted) identifier")
        value: Any = {"true": True, "false": False}.get(raw.strip().lower(), raw)
        _set_dotted(out, key, value)
    return out


def fsspec_options(url: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fsspec keyword arguments of ``options`` for ``url`` (deltalake keys translated
    where :data:`S3_KEYS` pairs them, dropped otherwise)."""
    out: dict[str, Any] = {}
    delta: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if _DELTA_KEY.fullmatch(key):
            delta[key.upper()] = value
        else:
            out[key] = _copy(value)
    if protocol_of(url) in _S3_PROTOCOLS:
        for fs_key, delta_key in S3_KEYS:
            if delta_key in delta and _get_dotted(out, fs_key) is None:
                value = delta[delta_key]
                if delta_key == "AWS_SKIP_SIGNATURE":
                    value = _truthy(value)
                _set_dotted(out, fs_key, value)
    return out


def delta_options(url: str, options: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The deltalake ``storage_options`` of ``options`` for ``url``; ``None`` for local paths
    or when there is nothing to pass (deltalake then reads the environment alone)."""
    if not is_remote(url):
        return None
    out: dict[str, str] = {}
    for key, value in (options or {}).items():
        if _DELTA_KEY.fullmatch(key):
            out[key.upper()] = _text(value)
    if protocol_of(url) in _S3_PROTOCOLS:
        for fs_key, delta_key in S3_KEYS:
            value = _get_dotted(options or {}, fs_key)
            if value is not None and delta_key not in out:
                out[delta_key] = _text(value)
        endpoint = out.get("AWS_ENDPOINT_URL") or out.get("AWS_ENDPOINT_URL_S3") or next(
            (os.environ[k] for k in ENDPOINT_ENV if os.environ.get(k)), "")
        if endpoint.lower().startswith("http://") and "AWS_ALLOW_HTTP" not in out \
                and "AWS_ALLOW_HTTP" not in os.environ:
            out["AWS_ALLOW_HTTP"] = "true"
    return out or None


def sibling_url(url: str, name: str) -> str:
    """The location called ``name`` in the folder that holds ``url`` (a path or any URL)."""
    text = str(url).rstrip("/")
    if "://" not in text:
        return os.path.join(os.path.dirname(text), name)
    head, sep, _ = text.rpartition("/")
    if not sep or head.endswith(":/"):
        raise ConfigError(f"{url}: has no parent folder to put {name!r} in")
    return f"{head}/{name}"


def add_storage_option_argument(parser: argparse.ArgumentParser) -> None:
    """Adds the repeatable ``--storage-option KEY=VALUE`` flag (read it with :func:`from_args`)."""
    parser.add_argument(
        "--storage-option", action="append", metavar="KEY=VALUE", default=[],
        help="object-store option for the output and table URLs, repeatable: fsspec names "
             "(endpoint_url, key, secret, anon, client_kwargs.region_name) or deltalake "
             "names (AWS_ENDPOINT_URL, ...); AWS_* environment variables are read too "
             "(docs/scaling.md)")


def from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The parsed ``--storage-option`` flags, or ``None`` when there are none."""
    return parse_storage_options(getattr(args, "storage_option", None) or []) or None


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"storage option {key!r}: {part!r} is already set to a value")
        target = node
    target[last] = value


def _get_dotted(source: Mapping[str, Any], key: str) -> Any:
    node: Any = source
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _copy(value: Any) -> Any:
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _truthy(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)
