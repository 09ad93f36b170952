"""A model repository in an S3-compatible bucket (AWS S3, MinIO, ...): ``s3://bucket/prefix``.

Layout as on disk: ``<prefix>/<model>/config.pbtxt``, ``<prefix>/<model>/<version>/
model.pt`` (and ``model.pt.sha256``). A listing is one paginated LIST of the prefix;
configs and checksum sidecars are small and fetched at listing time (again only when
their ETag changes); artifacts are fetched on demand into the artifact cache, keyed by
their ETag, so a replaced object is never served from a stale copy.

Settings are boto3's own (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_PROFILE, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL(_S3)), overridden by
``--s3-endpoint-url`` and ``--s3-region``. Every botocore error becomes a
RepositoryUnavailable naming the repository and what went wrong, here where it enters.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelpool.gpu.artifact_cache import ArtifactCache
from modelpool.gpu.checksums import Hasher, check, verify
from modelpool.gpu.sources import (
    S3_SCHEME,
    Artifact,
    ModelFiles,
    RepositorySettings,
    StoredFile,
)
from modelpool.placement.errors import RepositoryUnavailable

try:
    from botocore import exceptions as bx

    _BOTO_ERRORS: tuple[type[Exception], ...] = (bx.BotoCoreError, bx.ClientError)
except ImportError:  # no boto3: S3Source() says how to install it
    _BOTO_ERRORS = ()

log = logging.getLogger(__name__)

#: After a failed listing, answer from the failure for this long: the gateway lists
#: from its event loop, which must not stall on every request during an outage.
FAILURE_HOLD_S = 5.0
#: Seconds a name found missing from the bucket is answered "not found" without a
#: LIST (a model uploaded meanwhile is seen after this long), and how many are kept.
MISS_HOLD_S = 2.0
MAX_MISSES = 4096
#: A download logs its progress this often.
PROGRESS_EVERY_S = 5.0
_CHUNK = 1 << 20
_VERSION_FILE_RE = re.compile(r"[0-9]+/[^/]+")
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
}


def parse_location(location: str) -> tuple[str, str]:
    """(bucket, prefix without surrounding '/') of ``s3://bucket/prefix``."""
    rest = location[len(S3_SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"model repository '{location}' names no bucket (s3://bucket/prefix)")
    return bucket, prefix.strip("/")


class S3Source:
    """Raises ValueError at construction when boto3 is missing or the bucket cannot be
    listed (the message says which bucket and why), so ``serve`` fails at start."""

    def __init__(self, location: str, settings: RepositorySettings) -> None:
        self.bucket, self.prefix = parse_location(location)
        self.location = f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")
        self.cache = ArtifactCache(settings.resolved_cache_dir(), settings.cache_bytes)
        self._cache_prefix = "/".join(p for p in ("s3", self.bucket, self.prefix) if p)
        self.root = self.cache.path(self._cache_prefix)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hasher = Hasher()
        self._client = _client(settings)
        self._texts: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._failed: tuple[float, RepositoryUnavailable] | None = None
        self._misses: dict[str, float] = {}
        try:
            self.models()
        except RepositoryUnavailable as e:
            raise ValueError(e.message) from None

    # -- listing -------------------------------------------------------------------------
    def models(self) -> dict[str, ModelFiles]:
        return self._list(None)

    def model(self, name: str) -> ModelFiles | None:
        # A name not in the bucket is remembered for a moment: requests for a model
        # that does not exist (a typo, a scan) must not each cost a LIST on the
        # gateway's event loop.
        now = time.monotonic()
        with self._lock:
            missed = self._misses.get(name)
        if missed is not None and now - missed < MISS_HOLD_S:
            return None
        files = self._list(name).get(name)
        if files is None:
            with self._lock:
                if len(self._misses) >= MAX_MISSES:
                    self._misses.clear()
                self._misses[name] = now
        return files

    def _list(self, name: str | None) -> dict[str, ModelFiles]:
        with self._lock:
            held = self._failed
        if held is not None and time.monotonic() - held[0] < FAILURE_HOLD_S:
            raise held[1]
        base = f"{self.prefix}/" if self.prefix else ""
        grouped: dict[str, dict[str, StoredFile]] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + (f"{name}/" if name else "")
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    model, _, rel = obj["Key"][len(base) :].partition("/")
                    if rel != "config.pbtxt" and not _VERSION_FILE_RE.fullmatch(rel):
                        continue
                    etag = str(obj.get("ETag", "")).strip('"')
                    path = self.cache.path(self._cache_key(model, rel, etag))
                    grouped.setdefault(model, {})[rel] = StoredFile(int(obj["Size"]), etag, path)
        except _BOTO_ERRORS as e:
            err = self._translate(e, f"listing s3://{self.bucket}/{base}")
            with self._lock:
                self._failed = (time.monotonic(), err)
            raise err from None
        with self._lock:
            self._failed = None
        return {m: self._files(m, files) for m, files in sorted(grouped.items())}

    def _files(self, model: str, files: dict[str, StoredFile]) -> ModelFiles:
        def read_text(rel: str) -> str:
            stored = files.get(rel)
            if stored is None:
                raise FileNotFoundError(f"{rel} is not in the listing")
            return self._read_text(self._key(model, rel), stored.stamp)

        return ModelFiles(model, f"{self.location}/{model}", files, read_text)

    def _read_text(self, key: str, etag: str) -> str:
        """A small object's text, fetched once per ETag."""
        with self._lock:
            known = self._texts.get((key, etag))
        if known is not None:
            return known
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except _BOTO_ERRORS as e:
            if _code(e) in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"s3://{self.bucket}/{key} is gone") from None
            raise self._translate(e, f"reading s3://{self.bucket}/{key}") from None
        text = body.decode()  # UnicodeDecodeError: the caller reports a bad config
        with self._lock:
            self._texts[(key, etag)] = text
        return text

    # -- artifacts -----------------------------------------------------------------------
    @contextlib.contextmanager
    def artifact(self, artifact: Artifact) -> Iterator[Path]:
        key = self._key(artifact.model, artifact.relpath)
        fetched: list[str] = []

        def fill(tmp: Path) -> None:
            fetched.append(self._download(key, tmp, artifact))

        cache_key = self._cache_key(artifact.model, artifact.relpath, artifact.file.stamp)
        with self.cache.entry(cache_key, artifact.file.size, fill) as path:
            if fetched:
                self.hasher.remember(path, fetched[0])
            verify(self.hasher, path, artifact.declared, artifact.what)
            yield path

    def _download(self, key: str, tmp: Path, artifact: Artifact) -> str:
        """Stream the object to ``tmp``, hashing and logging progress; checks the
        declared digest before the file is renamed into the cache. Returns the sha256."""
        url = f"s3://{self.bucket}/{key}"
        total = artifact.file.size
        log.info("fetching %s (%d bytes) for %s", url, total, artifact.what)
        started = last = time.monotonic()
        done = 0
        h = hashlib.sha256()
        try:
            # IfMatch: the object listed, not one replaced since (its ETag is the key).
            resp = self._client.get_object(Bucket=self.bucket, Key=key, IfMatch=artifact.file.stamp)
            with tmp.open("wb") as f:
                for chunk in resp["Body"].iter_chunks(_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last >= PROGRESS_EVERY_S:
                        last = now
                        log.info(
                            "fetching %s: %d of %d bytes (%.0f%%, %.1f MB/s)",
                            url, done, total, 100.0 * done / max(total, 1),
                            done / (now - started) / 1e6,
                        )  # fmt: skip
        except OSError as e:
            raise RepositoryUnavailable(
                f"{artifact.what}: fetching {url} into the artifact cache {self.cache.root} "
                f"failed: {e}"
            ) from None
        except _BOTO_ERRORS as e:
            if _code(e) in ("PreconditionFailed", "412"):
                raise RepositoryUnavailable(
                    f"{artifact.what}: {url} changed while being fetched; try again"
                ) from None
            raise self._translate(e, f"{artifact.what}: fetching {url}") from None
        if done != total:
            raise RepositoryUnavailable(
                f"{artifact.what}: {url} ended after {done} of {total} bytes; try again"
            )
        digest = h.hexdigest()
        check(digest, artifact.declared, artifact.what)
        log.info("fetched %s: %d bytes in %.1fs", url, done, time.monotonic() - started)
        return digest

    # -- names and errors ----------------------------------------------------------------
    def _key(self, model: str, rel: str) -> str:
        return "/".join(p for p in (self.prefix, model, rel) if p)

    def _cache_key(self, model: str, rel: str, etag: str) -> str:
        """``s3/<bucket>/<prefix>/<model>/<version>/<etag>/<file>``: a new object under
        the same key is a new entry; the old one ages out."""
        head, _, filename = rel.rpartition("/")
        tag = re.sub(r"[^A-Za-z0-9_-]", "_", etag) or "none"
        return "/".join(p for p in (self._cache_prefix, model, head, tag, filename) if p)

    def _translate(self, err: Exception, doing: str) -> RepositoryUnavailable:
        return RepositoryUnavailable(
            f"model repository {self.location} is unavailable: {doing}: {_reason(err, self.bucket)}",
            retry_after_s=FAILURE_HOLD_S,
        )


def _client(settings: RepositorySettings) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ValueError(
            "an s3:// model repository needs boto3: pip install 'modelpool[s3]'"
        ) from None
    config = Config(
        connect_timeout=3,
        read_timeout=30,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=config,
    )


def _code(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _reason(err: Exception, bucket: str) -> str:
    """What went wrong, in words an operator can act on."""
    code = _code(err)
    if code == "NoSuchBucket":
        return f"bucket '{bucket}' does not exist"
    if code in _AUTH_CODES or code == "403":
        return (
            f"access to bucket '{bucket}' was refused ({code}): check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and the bucket's policy"
        )
    if isinstance(err, bx.NoCredentialsError):
        return (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE)"
        )
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        endpoint = getattr(err, "kwargs", {}).get("endpoint_url", "")
        return f"cannot connect to the endpoint {endpoint.split('?')[0]} ({type(err).__name__})"
    if code:
        message = getattr(err, "response", {}).get("Error", {}).get("Message", "")
        return f"{code}: {message}".rstrip(": ")
    return str(err) or type(err).__name__
