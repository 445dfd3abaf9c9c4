"""Object storage: s3:// through boto3, file:// and plain paths through the filesystem.

Credentials, region and endpoint come from boto3's own variables and credential
chain (AWS_ENDPOINT_URL_S3, AWS_REGION, IRSA web identity, ...); so do
AWS_RETRY_MODE and AWS_MAX_ATTEMPTS, which default here to `standard` and 5.
Every failure becomes a StorageError whose message names the object, never a secret."""

import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from job.errors import JobError, StorageError

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# Client errors that retrying cannot fix: the run is misconfigured.
PERMANENT_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
    "NoSuchKey", "404", "403", "400", "InvalidBucketName", "ExpiredToken", "InvalidToken", "AuthorizationHeaderMalformed",
}
MiB = 1 << 20


def check_uri(uri: str) -> str:
    """Return the URI if it names an S3 object/prefix or a local path, else raise ValueError."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not BUCKET_NAME.match(parsed.netloc):
            raise ValueError(f"{uri!r} has no valid bucket name (expected s3://bucket/key)")
        return uri
    if parsed.scheme == "file":
        if not parsed.path:
            raise ValueError(f"{uri!r} has no path")
        return uri
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ValueError(f"unsupported scheme {parsed.scheme + '://'!r}: use s3://, file:// or a local path")
    if not uri.strip():
        raise ValueError("is empty")
    return uri


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI or path with single slashes."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    return Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)


@functools.cache
def _client(endpoint: str | None, region: str | None, retry_mode: str, max_attempts: int):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},
        connect_timeout=3,
        read_timeout=60,
        # A custom endpoint (MinIO, SeaweedFS, a proxy) rarely has wildcard DNS for bucket subdomains.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    # endpoint and region are part of the cache key only; boto3 reads them from the environment itself.
    return boto3.session.Session().client("s3", config=config)


def client():
    """The process's S3 client, rebuilt when the endpoint or retry variables change."""
    return _client(
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        os.environ.get("AWS_RETRY_MODE", "standard"),
        int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
    )


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    # 16 MiB parts: 10,000 parts cover 156 GiB, far beyond any adapter or dataset here.
    return TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=8)


@contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Turn boto3 and OS errors into a StorageError naming the object."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as error:
        info = error.response.get("Error", {})
        code = str(info.get("Code", "?"))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        reason = info.get("Message") or {"404": "not found", "403": "access denied"}.get(code, code)
        raise StorageError(f"{uri}: {code}: {reason}", permanent=code in PERMANENT_CODES or status in (400, 403, 404)) from None
    except NoCredentialsError:
        raise StorageError(f"{uri}: no S3 credentials found (set AWS_* variables or use workload identity)", permanent=True) from None
    except Boto3Error as error:
        # s3transfer wraps the ClientError of a failed upload/download into its own type.
        reason = str(error).split("An error occurred ", 1)[-1]
        code = reason.removeprefix("(").split(")", 1)[0]
        raise StorageError(f"{uri}: {reason}", permanent=code in PERMANENT_CODES) from None
    except BotoCoreError as error:
        # Connection failures arrive here after boto3's retries are spent.
        raise StorageError(f"{uri}: {type(error).__name__}: {error}") from None
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found", permanent=True) from None
    except PermissionError:
        raise StorageError(f"{uri}: permission denied", permanent=True) from None
    except OSError as error:
        raise StorageError(f"{uri}: {error.strerror or error}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_file(uri: str, dest: Path) -> Path:
    """Copy one object to dest (written beside it, then renamed, so dest is never partial)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with _errors(uri):
        if is_s3(uri):
            bucket, key = _split(uri)
            client().download_file(bucket, key, str(partial), Config=_transfer_config())
        else:
            shutil.copyfile(local_path(uri), partial)
        partial.replace(dest)
    return dest


def object_exists(uri: str) -> bool:
    """Whether an S3 key is one object. A 403 counts as absent: without s3:ListBucket, S3 answers 403
    for a missing key, and listing the prefix next gives the real cause."""
    bucket, key = _split(uri)
    if not key:
        return False
    try:
        with _errors(uri):
            client().head_object(Bucket=bucket, Key=key)
        return True
    except StorageError:
        return False


def dataset_objects(uri: str) -> tuple[list[str], bool]:
    """The objects a dataset URI names, as URIs, and whether it named a prefix or folder: the object or
    file itself, else every object under it (sorted by key). A trailing slash always means a prefix."""
    if not is_s3(uri):
        if not local_path(uri).is_dir():
            return [uri], False
        return [join(uri, key) for key in list_keys(uri)], True
    if not uri.endswith("/") and object_exists(uri):
        return [uri], False
    keys = list_keys(uri)
    if not keys and not uri.endswith("/"):
        raise StorageError(f"{uri}: not found (no such object, and nothing under it as a prefix)", permanent=True)
    return [join(uri, key) for key in keys], True


def local_target(dest: Path, key: str) -> Path:
    """dest / key for an object key read from a listing or a manifest. ValueError (saying why) for a key that
    could land anywhere else: absolute, an empty, '.' or '..' component, a NUL, or a path resolving outside dest."""
    if key.startswith("/"):
        raise ValueError("is an absolute path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError("has an empty, '.' or '..' path component")
    if "\x00" in key:
        raise ValueError("holds a NUL character")
    target = dest / key
    if not target.resolve().is_relative_to(dest.resolve()):  # e.g. through a symlink already in dest
        raise ValueError("resolves outside the destination folder")
    return target


def checked_targets(uri: str, dest: Path, keys: list[str], error: type[JobError] = StorageError) -> list[Path]:
    """local_target for every key, all checked before anything is written; `error` (the exit code of what
    is being read: a model, an adapter, data) names the first key refused."""
    targets = []
    for key in keys:
        try:
            targets.append(local_target(dest, key))
        except ValueError as why:
            raise error(f"{uri}: refusing object key {key!r}: it {why} (nothing was downloaded)") from None
    return targets


def fetch_prefix(uri: str, dest: Path, error: type[JobError] = StorageError) -> Path:
    """Copy every object under a prefix (a model folder) into dest, keeping relative paths. A key that would
    land outside dest raises `error` before anything is downloaded."""
    dest.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        with _errors(uri):
            shutil.copytree(local_path(uri), dest, dirs_exist_ok=True)
        return dest
    keys = [key for key in list_keys(uri) if key and not key.endswith("/")]  # "folder/" placeholders hold nothing
    if not keys:
        raise StorageError(f"{uri}: no objects under this prefix", permanent=True)
    for key, target in zip(keys, checked_targets(uri, dest, keys, error), strict=True):
        fetch_file(join(uri, key), target)
    return dest


def put_file(path: Path, uri: str) -> None:
    """Upload a file; multipart above 16 MiB, aborted by s3transfer if it fails."""
    with _errors(uri):
        if is_s3(uri):
            bucket, key = _split(uri)
            client().upload_file(str(path), bucket, key, Config=_transfer_config())
        else:
            target = local_path(uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(path, partial)
            partial.replace(target)


def put_bytes(data: bytes, uri: str) -> None:
    """Write (or replace) a small object in one request; local files are replaced atomically."""
    with _errors(uri):
        if is_s3(uri):
            bucket, key = _split(uri)
            client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.replace(target)


def put_if_absent(data: bytes, uri: str) -> bool:
    """Write data only if nothing is at uri yet (S3 If-None-Match: *). False when it already exists."""
    from botocore.exceptions import ClientError

    with _errors(uri):
        if is_s3(uri):
            bucket, key = _split(uri)
            try:
                client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
            return True
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.partial")
        partial.write_bytes(data)
        try:
            os.link(partial, target)  # atomic, and fails if target exists
        except FileExistsError:
            return False
        finally:
            partial.unlink()
        return True


def read_bytes(uri: str, max_bytes: int = 64 * MiB) -> bytes | None:
    """The object's content, or None when it does not exist. An object over max_bytes is refused (StorageError,
    permanent) before its body is read: these are small documents, and a huge one must not fill the memory."""
    with _errors(uri):
        if is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = _split(uri)
            try:
                response = client().get_object(Bucket=bucket, Key=key)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            _check_size(uri, response["ContentLength"], max_bytes, response["Body"].close)
            return response["Body"].read()
        path = local_path(uri)
        if not path.exists():
            return None
        _check_size(uri, path.stat().st_size, max_bytes)
        return path.read_bytes()


def _check_size(uri: str, size: int, max_bytes: int, close=None) -> None:
    if size > max_bytes:
        if close:
            close()
        raise StorageError(f"{uri}: {size} bytes, more than the {max_bytes} this document may have", permanent=True)


def list_keys(uri: str) -> list[str]:
    """Every object under a prefix, as paths relative to it (empty when there are none)."""
    if not is_s3(uri):
        root = local_path(uri)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return sorted(key for key, _ in _s3_objects(uri))


def _s3_objects(uri: str) -> Iterator[tuple[str, dict]]:
    """(path relative to the prefix, ListObjectsV2 entry) for every object under an S3 prefix."""
    bucket, prefix = _split(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    with _errors(uri):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"][len(prefix):], item


def content_fingerprint(uri: str, cache: Path | None = None) -> str:
    """sha256 that changes when anything under a prefix or folder does: S3 objects by key, size and
    ETag (one listing, nothing downloaded); local files by path and the sha256 of their bytes, each file's
    sha256 kept in `cache` (a JSON file) under its size, mtime and inode, so a folder hashed once costs
    a stat a file after (an 8B model's 16 GB took 17.6 s a run)."""
    digest = hashlib.sha256()
    if is_s3(uri):
        for key, item in sorted(_s3_objects(uri), key=lambda pair: pair[0]):
            digest.update(f"{key}:{item['Size']}:{item['ETag']}\n".encode())
    else:
        for key, sha256 in _file_digests(local_path(uri), list_keys(uri), cache).items():
            digest.update(f"{key}:{sha256}\n".encode())
    return digest.hexdigest()


RACY_NS = 2_000_000_000  # a file changed this close to its hashing may change again within one mtime tick: not cached


def _file_digests(root: Path, keys: list[str], cache: Path | None) -> dict[str, str]:
    """{key: sha256} of local files, reusing `cache`'s digest where a file's (size, mtime, inode) stamp is unchanged
    (as git's index and make do: a file rewritten with the same size and mtime is not noticed: touch it)."""
    try:
        known = json.loads(cache.read_text(encoding="utf-8")) if cache and cache.exists() else {}
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    digests, kept, now = {}, {}, time.time_ns()
    for key in keys:
        stat = (root / key).stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
        entry = known.get(key)
        digests[key] = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp else sha256_file(root / key)
        if now - stat.st_mtime_ns > RACY_NS:
            kept[key] = [stamp, digests[key]]
    if cache is not None and kept != known:
        try:  # a speed-up only: a read-only cache folder costs the hashing, not the run
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(cache.name + f".{os.getpid()}.partial")
            partial.write_text(json.dumps(kept), encoding="utf-8")
            partial.replace(cache)
        except OSError:
            pass
    return digests


def delete_keys(uri: str, keys: list[str]) -> None:
    """Delete the named objects under a prefix (missing ones are fine)."""
    with _errors(uri):
        if not is_s3(uri):
            for key in keys:
                (local_path(uri) / key).unlink(missing_ok=True)
            return
        bucket, prefix = _split(uri)
        client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"{prefix.rstrip('/')}/{k}"} for k in keys], "Quiet": True})


def delete_prefix(uri: str) -> None:
    """Delete every object under a prefix (old checkpoints)."""
    if not is_s3(uri):
        shutil.rmtree(local_path(uri), ignore_errors=True)
        return
    bucket, prefix = _split(uri)
    keys = [f"{prefix.rstrip('/')}/{k}" for k in list_keys(uri)]
    with _errors(uri):
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
