"""Where backups and archived log segments are stored: a local directory or an S3-compatible
bucket, behind one interface, so backup, archiving and restore run the same code on both.

A target holds named objects ("backups/00042/manifest.json"): whole byte strings, written
atomically (a reader sees all of an object or none of it), listed by prefix in name order.
Names are checked before anything is touched, so a name means the same object on both kinds.
Every failure of the storage itself is a `TargetError` with one line naming the target and
what failed; a bad name or URL is a `ValueError`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

MiB = 1024 * 1024
# Larger objects go up in parts: one put_object is capped at 5 GB, and a part that fails is
# resent alone. S3 refuses parts under 5 MiB (but the last).
PART_SIZE_BYTES = 64 * MiB
PART_SIZE_BYTES_MIN = 5 * MiB
# A dead endpoint fails in seconds instead of hanging a backup or the archiver.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
ATTEMPTS_MAX = 3

_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")  # 255: the longest file name Linux takes
_PARTIAL_SEGMENT = re.compile(r"[A-Za-z0-9._-]*")
# A put's temp file: "~" is never in a name, so list() never shows one, even one a crash left.
_TEMP_PREFIX = ".~put-"
_ACCESS_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
}


class TargetError(RuntimeError):
    """The target failed (unreachable, no such bucket, access denied, a full disk...): the
    message is one line naming the target and what failed, never a credential."""


class MissingObject(TargetError):
    """The target has no object of that name."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(f"{url}: no object {name!r}")
        self.url = url
        self.name = name


def check_name(name: str) -> str:
    """`name` if it is a valid object name: "/"-separated segments of [A-Za-z0-9._-], none
    empty, "." or "..". Such a name is the same key in a bucket and the same file under a
    directory, and cannot climb out of either."""
    if not isinstance(name, str) or not all(
        _SEGMENT.fullmatch(segment) and segment not in (".", "..") for segment in name.split("/")
    ):
        raise ValueError(
            f"bad object name {name!r}: '/'-separated segments of letters, digits, '.', '_' "
            "and '-', none empty, '.' or '..', no leading '/'"
        )
    return name


def _check_prefix(prefix: str) -> str:
    """`prefix` if some valid name could start with it ("" and "backups/" included)."""
    head, slash, last = prefix.rpartition("/")
    if slash:
        check_name(head)
    if not _PARTIAL_SEGMENT.fullmatch(last):
        raise ValueError(f"bad prefix {prefix!r}: a name starts with it only if it is one")
    return prefix


def _is_name(name: str) -> bool:
    try:
        check_name(name)
    except ValueError:
        return False
    return True


class Target(Protocol):
    """Named objects in a directory or a bucket; see the module's docstring."""

    url: str  # as the user named the target, for messages

    def put(self, name: str, data: bytes) -> None:
        """Store `data` as `name`, replacing any object of that name, atomically."""
        ...

    def get(self, name: str) -> bytes:
        """The object's bytes; `MissingObject` if there is none."""
        ...

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int:
        """The object's size in bytes; `MissingObject` if there is none."""
        ...

    def delete(self, name: str) -> None:
        """Remove the object; nothing happens if there is none."""
        ...

    def list(self, prefix: str = "", after: str | None = None) -> list[str]:
        """The names that start with `prefix`, sorted; with `after`, only those sorting after
        it (S3's StartAfter: a listing that reads only what is new)."""
        ...


# --------------------------------------------------------------------------------- directory


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new subdirectory) survive a crash. (The Raft
    storage has its own: cluster/raft/ is used through its package's surface only.)"""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exists(target: Target, name: str) -> bool:
    """Whether the target has an object of that name."""
    try:
        target.size(name)
    except MissingObject:
        return False
    return True


class DirTarget:
    """Objects as files under a local directory (created if missing); a name's segments
    are its subdirectories. Files are private to their owner (0600), as the state in them."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.url = str(path)
        self.root = Path(path).absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._failure("create the directory", None, exc) from exc

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*check_name(name).split("/"))

    def _failure(self, action: str, name: str | None, exc: OSError) -> TargetError:
        what = f"{action} {name!r}" if name is not None else action
        return TargetError(f"{self.url}: {what} failed: {exc.strerror or exc}")

    def put(self, name: str, data: bytes) -> None:
        """Write a temp file beside the object, fsync it, rename it over the object, fsync
        the directory: a reader or a crash sees the old object or the new one, whole."""
        path = self._path(name)
        try:
            # A concurrent delete() may prune the new directory before the temp file is in it.
            for attempt in range(3):
                self._make_dirs(path.parent)
                try:
                    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            fsync_dir(path.parent)
        except OSError as exc:
            raise self._failure("put", name, exc) from exc

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` and those missing above it, each fsynced into its parent: a
        crash must not lose the directory of an object put() reported written."""
        missing = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
            fsync_dir(directory.parent)

    def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MissingObject(self.url, name) from None
        except OSError as exc:
            raise self._failure("get", name, exc) from exc

    exists = _exists

    def size(self, name: str) -> int:
        path = self._path(name)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise MissingObject(self.url, name) from None
        except OSError as exc:
            raise self._failure("size", name, exc) from exc
        if path.is_dir():
            raise MissingObject(self.url, name)
        return st.st_size

    def delete(self, name: str) -> None:
        """Remove the file, then the directories it leaves empty (a bucket has none)."""
        path = self._path(name)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        except OSError as exc:
            raise self._failure("delete", name, exc) from exc
        for directory in path.parents:
            if directory == self.root:
                break
            try:
                directory.rmdir()
            except OSError:  # not empty (or not ours to remove): the rest stays
                break

    def list(self, prefix: str = "", after: str | None = None) -> list[str]:
        _check_prefix(prefix)
        start = self.root.joinpath(*prefix.split("/")[:-1])

        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):  # a directory a delete just pruned
                raise self._failure("list", prefix, exc) from exc

        names = []
        for directory, subdirectories, files in os.walk(start, onerror=fail):
            subdirectories[:] = [d for d in subdirectories if _SEGMENT.fullmatch(d)]
            relative = Path(directory).relative_to(self.root).as_posix()
            for file in files:
                name = file if relative == "." else f"{relative}/{file}"
                if name.startswith(prefix) and _is_name(name) and (after is None or name > after):
                    names.append(name)
        return sorted(names)


# ---------------------------------------------------------------------------------------- S3


def _client_from_environment():
    """An S3 client configured the usual AWS way: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible
    server (botocore reads them, the S3 one first, and addresses a custom endpoint by path)."""
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": ATTEMPTS_MAX},
    )
    try:
        return boto3.session.Session().client("s3", config=config)
    except (BotoCoreError, ValueError) as exc:  # a malformed endpoint URL is a ValueError
        raise TargetError(f"cannot configure the S3 client: {exc}") from exc


def _without_userinfo(url: str) -> str:
    """The endpoint for messages: a user:password@ someone put in it stays out of them."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class S3Target:
    """Objects as keys "<prefix>/<name>" in a bucket of S3 or an S3-compatible server.

    `client` is a boto3 S3 client; by default one from the environment. Objects above
    `part_size_bytes` are uploaded in parts of that size (a multipart upload, which S3 too
    makes visible at once, whole, when it completes)."""

    def __init__(
        self, bucket: str, prefix: str = "", client=None, *, part_size_bytes: int = PART_SIZE_BYTES
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", bucket):
            raise ValueError(f"bad bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_name(prefix)
        if part_size_bytes < PART_SIZE_BYTES_MIN:
            raise ValueError(
                f"part_size_bytes must be at least {PART_SIZE_BYTES_MIN} (S3's minimum)"
            )
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.client = client if client is not None else _client_from_environment()
        self.endpoint = _without_userinfo(self.client.meta.endpoint_url)
        self.part_size_bytes = part_size_bytes
        self._key_prefix = f"{prefix}/" if prefix else ""

    def _key(self, name: str) -> str:
        return self._key_prefix + check_name(name)

    def _failure(self, action: str, name: str | None, exc: Exception) -> TargetError:
        """The one-line error for a failed call (credentials are never in botocore's)."""
        where = f"{self.url}: {action}" + (f" {name!r}" if name is not None else "")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound") and name is not None:
                return MissingObject(self.url, name)
            if code == "NoSuchBucket":
                return TargetError(f"{where}: no such bucket {self.bucket!r} at {self.endpoint}")
            if code in _ACCESS_DENIED:
                return TargetError(
                    f"{where}: access denied ({code}) at {self.endpoint}: check the credentials "
                    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the bucket's policy"
                )
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = str(error.get("Message", "")).replace("\n", " ")
            return TargetError(f"{where}: {code or status} at {self.endpoint}: {message}")
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            return TargetError(f"{where}: cannot reach the endpoint {self.endpoint}")
        if isinstance(exc, ReadTimeoutError):
            return TargetError(f"{where}: no answer from {self.endpoint} in {READ_TIMEOUT_S} s")
        if isinstance(exc, NoCredentialsError):
            return TargetError(
                f"{where}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        return TargetError(f"{where} at {self.endpoint}: {type(exc).__name__}: {exc}")

    def _check_bucket(self, action: str, name: str) -> None:
        """A HEAD answers a bare 404 for a missing bucket as for a missing key: ask which."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                raise TargetError(
                    f"{self.url}: {action} {name!r}: no such bucket {self.bucket!r} "
                    f"at {self.endpoint}"
                ) from exc
            raise self._failure(action, name, exc) from exc
        except BotoCoreError as exc:
            raise self._failure(action, name, exc) from exc

    def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        try:
            if len(data) <= self.part_size_bytes:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
            else:
                parts = TransferConfig(
                    multipart_threshold=self.part_size_bytes,
                    multipart_chunksize=self.part_size_bytes,
                    max_concurrency=4,
                )
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=parts)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure("put", name, exc) from exc

    def get(self, name: str) -> bytes:
        key = self._key(name)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            with response["Body"] as body:
                return body.read()  # botocore checks the length against Content-Length
        except (ClientError, BotoCoreError) as exc:
            raise self._failure("get", name, exc) from exc

    exists = _exists

    def size(self, name: str) -> int:
        key = self._key(name)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except (ClientError, BotoCoreError) as exc:
            failure = self._failure("size", name, exc)
            if isinstance(failure, MissingObject):
                self._check_bucket("size", name)
            raise failure from exc

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)  # a missing key is no error
        except (ClientError, BotoCoreError) as exc:
            raise self._failure("delete", name, exc) from exc

    def list(self, prefix: str = "", after: str | None = None) -> list[str]:
        """Every page of the listing (S3 answers 1,000 keys a page); keys that are not names
        (a console's "folder/" marker, another tool's file) are left out."""
        _check_prefix(prefix)
        names = []
        start = {} if after is None else {"StartAfter": self._key_prefix + after}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key_prefix + prefix, **start
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    name = entry["Key"][len(self._key_prefix) :]
                    if _is_name(name):
                        names.append(name)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure("list", prefix, exc) from exc
        return sorted(names)


# ------------------------------------------------------------------------------------ by URL


def open_target(url: str) -> Target:
    """The target `url` names: `s3://bucket/some/prefix` (credentials and endpoint from the
    AWS variables), `file:///abs/path` or a plain path (a directory, created if missing)."""
    if not url:
        raise ValueError("no target given: a directory path, file:///path or s3://bucket/prefix")
    if "://" not in url:
        return DirTarget(url)
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"bad target {url!r}: a target URL has no '?' or '#' part")
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"bad target {url!r}: no bucket (s3://bucket/prefix)")
        prefix = parts.path.strip("/")
        if prefix:
            try:
                check_name(prefix)
            except ValueError:
                raise ValueError(
                    f"bad target {url!r}: the prefix {prefix!r} is not '/'-separated "
                    "segments of letters, digits, '.', '_' and '-'"
                ) from None
        return S3Target(parts.netloc, prefix)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"bad target {url!r}: a file URL names a local path, file:///path")
        if not parts.path:
            raise ValueError(f"bad target {url!r}: no path (file:///path)")
        return DirTarget(unquote(parts.path))
    raise ValueError(
        f"bad target {url!r}: unknown scheme {parts.scheme!r} "
        "(a directory path, file:///path or s3://bucket/prefix)"
    )


__all__ = [
    "DirTarget",
    "MissingObject",
    "S3Target",
    "Target",
    "TargetError",
    "check_name",
    "open_target",
]
