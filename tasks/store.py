"""The artifact store: where every stage reads its inputs and writes its outputs.

Two backends with the same behaviour: :class:`FileStore` (a folder, the embedded default) and
:class:`S3Store` (any S3-protocol server: AWS S3, MinIO; the storage that many workers share).
:func:`open_store` picks one from a URI.

Keys are relative '/'-separated paths (see :func:`stitchtime_core.artifacts.check_key`); a key can
never reach outside the store's root folder or prefix. Writes are atomic: a reader sees the old
object or the new one, never a part. A missing object raises :class:`ArtifactNotFound`; a store that
cannot be reached or refuses an operation raises :class:`~stitchtime_core.errors.StoreError`.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import boto3
import boto3.exceptions
import botocore.exceptions
import numpy as np
import torch
from botocore.config import Config

from stitchtime_core import artifacts
from stitchtime_core.errors import InputError, StitchtimeError, StoreError
from stitchtime_core.files import replacing

DEFAULT_STORE_DIR = "stitchtime-data"
"""The folder, in the working directory, that holds artifacts when the user names no store."""

# Temp files are named `.<name>.tmp-<uuid hex>` beside their target; listings skip them.
_TEMP_NAME = re.compile(r"^\..*\.tmp-[0-9a-f]{32}$")


class ArtifactNotFound(KeyError, StitchtimeError):
    """No object is stored under a key.

    Args:
        key: the missing key.
        uri: the store's root URI, for the message.
    """

    def __init__(self, key: str, uri: str | None = None):
        self.key = key
        self.uri = uri
        super().__init__(key, uri)  # both in args, so the error survives pickling

    def __str__(self) -> str:
        return f"no artifact {self.key!r} in {self.uri}" if self.uri else f"no artifact {self.key!r}"


def default_store_uri() -> str:
    """The file URI of ``./stitchtime-data`` in the current working directory."""
    return (Path.cwd() / DEFAULT_STORE_DIR).absolute().as_uri()


def open_store(uri: str) -> ArtifactStore:
    """Open the store a URI names.

    Args:
        uri: ``file:///abs/path``, a plain path (relative paths are taken from the working
            directory), or ``s3://bucket/prefix``.

    Returns:
        A :class:`FileStore` or an :class:`S3Store`. Opening writes nothing and reads nothing but, for a
        folder, its path's metadata (one ``stat``, to refuse a file at once); an S3 store is not contacted.

    Raises:
        ValueError: the URI is empty, has an unknown scheme, names no bucket or no folder, or names a
            folder whose path is a file.
    """
    uri = str(uri)
    if not uri:
        raise ValueError("store URI is empty")
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"store URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        if not _BUCKET.fullmatch(parts.netloc):
            # Not echoed: it may hold credentials (s3://key:secret@bucket), which would reach logs and
            # Prefect's flow-run parameters; they belong in the environment.
            raise ValueError("store URI does not name a valid S3 bucket (expected s3://bucket/prefix; give "
                             "credentials as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, never in the URI)")
        return S3Store(parts.netloc, parts.path.lstrip("/"))
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"store URI {redact_urls(uri)!r} must be file:///absolute/path")
        if not parts.path:  # file:// alone would be the working directory, which nobody means
            raise ValueError(f"store URI {uri!r} names no folder (expected file:///absolute/path)")
        return _folder_store(unquote(parts.path))
    # A single letter is a Windows drive, not a scheme.
    if len(parts.scheme) > 1:
        raise ValueError(f"store URI {uri!r} has unknown scheme {parts.scheme!r} (use file:// or s3://)")
    return _folder_store(uri)


def _folder_store(path: str) -> FileStore:
    """A FileStore at ``path``, refused at once when a file is there: every write would fail, and only after a
    stage had done its work."""
    store = FileStore(path)
    try:
        mode = os.stat(store.root).st_mode
    except OSError:  # missing (made on the first write), or not reachable: the first write says why
        return store
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{store.root}: a file, not a folder")
    return store


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
"""A bucket name as S3 and MinIO accept it (AWS's rules are stricter; its legacy names used capitals and '_')."""

_USERINFO = re.compile(r"(?<=://)[^/?#@\s]*@")


def redact_urls(text: str) -> str:
    """``text`` with the credentials of every URL in it (``scheme://user:password@host``) masked as ``***@``."""
    return _USERINFO.sub("***@", text)


def _check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key that may end with '/'."""
    if prefix:
        artifacts.check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class ArtifactStore(abc.ABC):
    """Bytes stored under keys, with helpers for the formats of :mod:`stitchtime_core.artifacts`.

    Subclasses implement the underscored methods; the public ones check keys first.
    """

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The store's root URI; ``open_store(store.uri)`` opens the same store."""

    @abc.abstractmethod
    def url_for(self, key: str) -> str:
        """The full URI of the object under ``key`` (whether or not it exists)."""

    @abc.abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    @abc.abstractmethod
    def _put_file(self, key: str, local_path: Path) -> None: ...

    @abc.abstractmethod
    def _get_file(self, key: str, local_path: Path) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> str:
        """Store bytes under a key, atomically replacing any object already there.

        Returns:
            The object's full URI.

        Raises:
            ValueError: the key is invalid.
            StoreError: the store refused the write.
        """
        self._put_bytes(artifacts.check_key(key), data)
        return self.url_for(key)

    def get_bytes(self, key: str) -> bytes:
        """The bytes stored under a key.

        Raises:
            ArtifactNotFound: nothing is stored under the key.
            ValueError: the key is invalid.
            StoreError: the store could not be read.
        """
        return self._get_bytes(artifacts.check_key(key))

    def exists(self, key: str) -> bool:
        """Whether an object is stored under a key.

        Raises:
            ValueError: the key is invalid.
            StoreError: the store could not be read.
        """
        return self._exists(artifacts.check_key(key))

    def delete(self, key: str) -> None:
        """Delete the object under a key; deleting a missing object does nothing (as on S3).

        Raises:
            ValueError: the key is invalid.
            StoreError: the store refused the deletion.
        """
        self._delete(artifacts.check_key(key))

    def list(self, prefix: str = "") -> list[str]:
        """The keys that start with ``prefix`` (a plain string prefix, as on S3), sorted.

        Raises:
            ValueError: the prefix is not empty and not a key (with or without a trailing '/').
            StoreError: the store could not be read.
        """
        return self._list(_check_prefix(prefix))

    def put_file(self, key: str, local_path: str | os.PathLike) -> str:
        """Upload a local file, streamed (for videos and other big files), atomically.

        Returns:
            The object's full URI.

        Raises:
            FileNotFoundError: ``local_path`` is not a file.
            ValueError: the key is invalid.
            StoreError: the store refused the write.
        """
        artifacts.check_key(key)
        local_path = Path(local_path)
        if not local_path.is_file():
            raise FileNotFoundError(f"{local_path}: not a file, cannot store it as {key!r}")
        self._put_file(key, local_path)
        return self.url_for(key)

    def get_file(self, key: str, local_path: str | os.PathLike) -> Path:
        """Download an object to a local file, streamed; the file appears whole or not at all.

        Missing parent folders of ``local_path`` are created.

        Returns:
            ``local_path`` as a Path.

        Raises:
            ArtifactNotFound: nothing is stored under the key.
            ValueError: the key is invalid.
            StoreError: the store could not be read.
        """
        artifacts.check_key(key)
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        self._get_file(key, local_path)
        return local_path

    def put_json(self, key: str, obj: Any) -> str:
        """Store JSON data (see :func:`stitchtime_core.artifacts.json_to_bytes`); returns the URI."""
        return self.put_bytes(key, artifacts.json_to_bytes(obj))

    def get_json(self, key: str) -> Any:
        """Read JSON data stored by :meth:`put_json`.

        Raises:
            InputError: the object is not JSON (so with :meth:`get_table` and :meth:`get_tensors`).
        """
        return self._decode(key, "JSON", artifacts.json_from_bytes)

    def put_table(self, key: str, columns: Mapping[str, np.ndarray | list]) -> str:
        """Store a per-frame table as Parquet (see :func:`stitchtime_core.artifacts.table_to_bytes`)."""
        return self.put_bytes(key, artifacts.table_to_bytes(columns))

    def get_table(self, key: str) -> dict[str, np.ndarray]:
        """Read a table stored by :meth:`put_table`, with its original shapes and dtypes."""
        return self._decode(key, "Parquet", artifacts.table_from_bytes)

    def put_tensors(
        self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> str:
        """Store tensors as safetensors (see :func:`stitchtime_core.artifacts.tensors_to_bytes`)."""
        return self.put_bytes(key, artifacts.tensors_to_bytes(tensors, metadata))

    def get_tensors(self, key: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read tensors stored by :meth:`put_tensors`, onto ``device``."""
        tensors = self._decode(key, "safetensors", artifacts.tensors_from_bytes)
        return {name: t.to(device) for name, t in tensors.items()}

    def _decode(self, key: str, what: str, decode: Callable[[bytes], Any]) -> Any:
        """``decode`` of the bytes under ``key``; an object it cannot parse is an InputError naming it."""
        data = self.get_bytes(key)
        try:
            return decode(data)
        except Exception as exc:  # noqa: BLE001 - any parser failure means the object is unusable
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise InputError(self.url_for(key), f"is not a readable {what} artifact ({reason})") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# --- file:// --------------------------------------------------------------------------------------

_PERMANENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                        errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP})
"""OS errors that come back the same when the operation is tried again seconds later: a full or read-only disk,
a refused permission, a file where a folder should be (or the reverse)."""


def _write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``target`` through a temp file in its folder (:func:`~stitchtime_core.files.replacing`).

    Args:
        target: the final path; its parent must exist.
        write: called with the open temp file (binary) to fill it.
    """
    with replacing(target) as temp, open(temp, "xb") as f:
        write(f)


class FileStore(ArtifactStore):
    """Artifacts as files under a root folder, which is created on the first write.

    Args:
        root: the root folder; a relative path is taken from the working directory.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def url_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*artifacts.check_key(key).split("/"))

    @contextlib.contextmanager
    def _store_errors(self, key: str, action: str) -> Iterator[None]:
        """Report the store's OS errors (permissions, full disk, ...) as StoreError. One of :data:`_PERMANENT`,
        or a root folder that is a file or cannot be made, is not worth a retry seconds later."""
        try:
            yield
        except OSError as exc:
            raise self._error(exc, key, action) from exc

    def _error(self, exc: OSError, key: str, action: str) -> StoreError:
        """The StoreError of an OS error met on ``action`` of ``key``: naming the root folder when the fault is
        the folder's own (a file in its place, or it cannot be made), else the object."""
        reason = exc.strerror or str(exc)
        permanent = exc.errno in _PERMANENT
        try:
            mode = os.stat(self.root).st_mode
        except (FileNotFoundError, NotADirectoryError):  # missing: the failed write was to make it
            file = self._file_above()
            if file is not None:
                return StoreError(f"{self.root}: cannot create the store folder: {file} is a file, not a folder",
                                  transient=False)
            return StoreError(f"{self.root}: cannot create the store folder ({reason})",
                              transient=not permanent and exc.errno != errno.ENOENT)
        except OSError:
            pass  # cannot tell; the error itself says enough
        else:
            if not stat.S_ISDIR(mode):
                return StoreError(f"{self.root}: the store folder is a file, not a folder", transient=False)
        return StoreError(f"{self.url_for(key)}: cannot {action}: {reason}", transient=not permanent)

    def _file_above(self) -> Path | None:
        """The nearest existing path above the missing root, when it is a file (so the root cannot be made)."""
        for parent in self.root.parents:
            try:
                mode = os.stat(parent).st_mode
            except OSError:
                continue
            return None if stat.S_ISDIR(mode) else parent
        return None

    def _not_found(self, key: str, action: str) -> None:
        """Called where ``key`` was not found: raise the store folder's own fault when a file has taken the
        folder's place since the store was opened, as a write would, rather than report nothing stored."""
        if self.root.is_file():
            raise self._error(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), key, action)

    def _put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._store_errors(key, "write"):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, lambda f: f.write(data))

    @contextlib.contextmanager
    def _open_for_reading(self, key: str) -> Iterator[BinaryIO]:
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self._not_found(key, "read")
            raise ArtifactNotFound(key, self.uri) from None
        except OSError as exc:
            raise self._error(exc, key, "read") from exc
        with f:
            yield f

    def _get_bytes(self, key: str) -> bytes:
        with self._open_for_reading(key) as f, self._store_errors(key, "read"):
            return f.read()

    def _exists(self, key: str) -> bool:
        with self._store_errors(key, "read"):  # is_file() raises what is neither "missing" nor "not a folder"
            found = self._path(key).is_file()
        if not found:
            self._not_found(key, "read")
        return found

    def _delete(self, key: str) -> None:
        path = self._path(key)
        with self._store_errors(key, "delete"):
            if path.is_file():
                path.unlink(missing_ok=True)

    def _list(self, prefix: str) -> list[str]:
        # Walk only the deepest folder the prefix names in full.
        folder = self.root.joinpath(*prefix.split("/")[:-1])
        keys = []
        for dirpath, _, filenames in os.walk(folder):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix) and not _TEMP_NAME.match(name):
                    keys.append(key)
        if not keys:
            self._not_found(prefix, "list")
        return sorted(keys)

    def _put_file(self, key: str, local_path: Path) -> None:
        path = self._path(key)
        with open(local_path, "rb") as src, self._store_errors(key, "write"):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def _get_file(self, key: str, local_path: Path) -> None:
        # Errors writing the local file are the caller's, so they stay plain OSErrors.
        with self._open_for_reading(key) as src:
            _write_atomically(local_path, lambda f: shutil.copyfileobj(src, f, 1 << 20))


# --- s3:// ----------------------------------------------------------------------------------------

_BOTO_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
)
_BROKEN_BODY = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError)
"""A response body cut off on the way (the connection reset, the server gone): the request may be made again."""
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_PROBLEMS = {
    "NoSuchBucket": "bucket does not exist",
    "AccessDenied": "access denied (check the credentials and the bucket policy)",
    "403": "access denied (check the credentials and the bucket policy)",
    "Forbidden": "access denied (check the credentials and the bucket policy)",
    "InvalidAccessKeyId": "the server does not know the access key id",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "ExpiredToken": "the session token has expired",
}
_PERMANENT_CODES = frozenset(_PROBLEMS) | {"InvalidBucketName", "AllAccessDisabled", "NoSuchKey", "404"}
"""Refusals that come back the same however often the request is made: not worth a retry."""


class S3Store(ArtifactStore):
    """Artifacts as objects under a prefix in an S3 bucket (AWS S3, MinIO, any S3-protocol server).

    The endpoint, credentials and region come from boto3's usual sources: ``AWS_ENDPOINT_URL``
    (for MinIO), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles. The region
    is ``AWS_DEFAULT_REGION``, else ``us-east-1``. They are read when the store is created.

    Args:
        bucket: the bucket, which must exist.
        prefix: the folder inside the bucket that holds this store's keys ('' for the whole bucket).
        max_attempts: attempts per request, retrying transient errors with backoff.
    """

    def __init__(self, bucket: str, prefix: str = "", *, max_attempts: int = 5):
        prefix = prefix.strip("/")
        if prefix:
            artifacts.check_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self._max_attempts = max_attempts
        # A session of its own, so that credentials are resolved from the environment of now.
        self._session = boto3.session.Session()
        self._client = self._session.client(
            "s3",
            region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            # No endpoint_url: boto3 reads AWS_ENDPOINT_URL itself, and passing one would override it.
            # botocore's own "max_attempts" counts the retries after the first try; "total_max_attempts" the tries.
            config=Config(retries={"total_max_attempts": max_attempts, "mode": "standard"}),
        )

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def _object_key(self, key: str) -> str:
        return self.prefix + artifacts.check_key(key)

    def _secrets(self) -> list[str]:
        """The credentials in use, to scrub them from any message."""
        try:
            credentials = self._session.get_credentials()
            frozen = credentials.get_frozen_credentials() if credentials else None
        except Exception:
            return []
        if frozen is None:
            return []
        return [s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s]

    def _error(self, exc: Exception, key: str | None) -> StoreError:
        """A one-line StoreError for a boto error, naming the bucket or object and never a credential."""
        target = self.url_for(key) if key is not None else self.uri
        transient = True
        if isinstance(exc, boto3.exceptions.S3UploadFailedError) and isinstance(
            exc.__context__, botocore.exceptions.ClientError
        ):
            exc = exc.__context__
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "unknown"))
            problem = _PROBLEMS.get(code) or error.get("Message") or "request refused"
            if code == "NoSuchBucket":
                problem = f"bucket {self.bucket!r} does not exist"
            message = f"{target}: {problem} ({code})"
            transient = code not in _PERMANENT_CODES
        elif isinstance(exc, botocore.exceptions.EndpointConnectionError):
            message = f"{target}: cannot connect to {exc.kwargs.get('endpoint_url', 'the S3 endpoint')}"
        elif isinstance(exc, botocore.exceptions.NoCredentialsError):
            message = f"{target}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            transient = False
        else:
            message = f"{target}: {type(exc).__name__}: {exc}"
        return StoreError(self._scrub(message), transient=transient)

    def _scrub(self, message: str) -> str:
        """The message on one line, with the credentials in use and any in a URL (the endpoint's) masked."""
        for secret in self._secrets():
            message = message.replace(secret, "***")
        return " ".join(redact_urls(message).split())

    @contextlib.contextmanager
    def _s3_errors(self, key: str | None) -> Iterator[None]:
        """Turn boto errors into StoreError. ``from None``: boto's own messages stay out of logs."""
        try:
            yield
        except _BOTO_ERRORS as exc:
            raise self._error(exc, key) from None

    @staticmethod
    def _is_not_found(exc: botocore.exceptions.ClientError) -> bool:
        return str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES

    def _check_bucket(self) -> None:
        """Tell a missing bucket from a missing object after a 404 without a reason (HEAD requests).

        Raises:
            StoreError: the bucket does not exist or cannot be reached.
        """
        with self._s3_errors(None):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as exc:
                if self._is_not_found(exc):
                    message = f"{self.uri}: bucket {self.bucket!r} does not exist (404)"
                    raise StoreError(message, transient=False) from None
                raise

    def _put_bytes(self, key: str, data: bytes) -> None:
        with self._s3_errors(key):
            self._client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data)

    def _get_bytes(self, key: str) -> bytes:
        # botocore retries a request that fails, but not a body cut off while it is read: that is
        # retried here, as download_file does.
        with self._s3_errors(key):
            for attempt in range(1, self._max_attempts + 1):
                try:
                    response = self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))
                    return response["Body"].read()
                except botocore.exceptions.ClientError as exc:
                    if self._is_not_found(exc):
                        raise ArtifactNotFound(key, self.uri) from None
                    raise
                except _BROKEN_BODY:
                    if attempt == self._max_attempts:
                        raise
                    time.sleep(min(0.5 * 2**attempt, 8))

    def _exists(self, key: str) -> bool:
        with self._s3_errors(key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._object_key(key))
                return True
            except botocore.exceptions.ClientError as exc:
                if not self._is_not_found(exc):
                    raise
        self._check_bucket()
        return False

    def _delete(self, key: str) -> None:
        with self._s3_errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def _list(self, prefix: str) -> list[str]:
        keys = []
        with self._s3_errors(None):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def _put_file(self, key: str, local_path: Path) -> None:
        # upload_file switches to multipart for big files; S3 assembles those atomically too.
        with self._s3_errors(key):
            self._client.upload_file(str(local_path), self.bucket, self._object_key(key))

    def _get_file(self, key: str, local_path: Path) -> None:
        # download_file writes a temp file beside local_path and renames it when complete.
        with self._s3_errors(key):
            try:
                self._client.download_file(self.bucket, self._object_key(key), str(local_path))
                return
            except botocore.exceptions.ClientError as exc:
                if not self._is_not_found(exc):
                    raise
        self._check_bucket()
        raise ArtifactNotFound(key, self.uri)
