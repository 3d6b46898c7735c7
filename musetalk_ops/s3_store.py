"""The S3 backend of the object store (AWS, MinIO, moto): imported only where a bucket is configured,
so local runs and the Dagster code location never load boto3."""

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from musetalk_ops.errors import InputError, StoreError
from musetalk_ops.files import write_atomic
from musetalk_ops.store import ObjectInfo, Store, check_key, check_prefix, is_key, local_file, shown

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
# A conditional write that lost: the key exists, or a concurrent conditional write is in progress.
_TAKEN = ("PreconditionFailed", "ConditionalRequestConflict")


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class S3Store(Store):
    """An S3 bucket (AWS, MinIO, moto) under an optional key prefix.

    Each object is written by one PUT (or one multipart upload, which also appears only when
    complete), so writes are atomic. ``move`` is copy + delete: for a moment both keys exist.
    The client's timeouts and retries are kept short so that an unreachable endpoint fails within
    seconds (connect_timeout × attempts plus backoff) and a hung one within read_timeout × attempts;
    the timeouts default to ``$MUSETALK_S3_CONNECT_TIMEOUT`` / ``$MUSETALK_S3_READ_TIMEOUT`` (else 5 s
    and 60 s), ``max_attempts`` to boto3's own setting (``AWS_MAX_ATTEMPTS``, else 3).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        client=None,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_attempts: int | None = None,
    ):
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket or ""):
            raise InputError(f"invalid S3 bucket name {shown(bucket)}")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{check_key(prefix)}/" if prefix else ""
        if client is None:
            connect_timeout = _timeout(connect_timeout, "MUSETALK_S3_CONNECT_TIMEOUT", 5.0)
            read_timeout = _timeout(read_timeout, "MUSETALK_S3_READ_TIMEOUT", 60.0)
            session = boto3.session.Session()
            retries = {"total_max_attempts": max_attempts} if max_attempts else None
            client = session.client(
                "s3",
                region_name=os.environ.get("AWS_REGION") or session.region_name or "us-east-1",
                endpoint_url=endpoint_url,  # None: boto3 reads AWS_ENDPOINT_URL_S3 / its config itself
                config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout, retries=retries),
            )
        self._client = client
        self.endpoint = client.meta.endpoint_url

    def _uri(self, target: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{target}"

    def uri(self, key: str) -> str:
        return self._uri(check_prefix(key))

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextlib.contextmanager
    def _errors(self, target: str) -> Iterator[None]:
        """botocore/boto3 errors → one-line StoreError naming the object (or prefix) and endpoint."""
        try:
            yield
        except S3UploadFailedError as e:
            cause = e.__context__
            raise self._translate(
                cause if isinstance(cause, BotoCoreError | ClientError) else e, target
            ) from None
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, target) from None

    def _translate(self, error: Exception, target: str) -> StoreError:
        if isinstance(error, ClientError):
            code = _code(error)
            if code in _NOT_FOUND:
                return StoreError(f"object not found: {self._uri(target)}")
            if code == "NoSuchBucket":
                return StoreError(f"bucket not found: s3://{self.bucket} at {self.endpoint}")
            message = error.response.get("Error", {}).get("Message", "")
            return StoreError(_one_line(f"object store error for {self._uri(target)}: {code} {message}"))
        if isinstance(error, BotoConnectionError | HTTPClientError):
            return StoreError(_one_line(f"object store unreachable at {self.endpoint}: {error}"))
        if isinstance(error, NoCredentialsError):
            return StoreError(
                f"no S3 credentials for s3://{self.bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "a profile or a role"
            )
        return StoreError(
            _one_line(f"object store error for {self._uri(target)} at {self.endpoint}: {error}")
        )

    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors(key):
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._full(key)
        with self._errors(key):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        full = self._full(key)
        with self._errors(key):
            write_atomic(Path(path), lambda f: self._client.download_fileobj(self.bucket, full, f))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        full, local = self._full(key), local_file(path)
        with self._errors(key):
            self._client.upload_file(str(local), self.bucket, full)

    def create(self, key: str, data: bytes) -> bool:
        full = self._full(key)
        with self._errors(key):
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data), IfNoneMatch="*")
            except ClientError as e:
                if _code(e) in _TAKEN:
                    return False
                raise
        return True

    def exists(self, key: str) -> bool:
        full = self._full(key)
        with self._errors(key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=full)
            except ClientError as e:
                if _code(e) in _NOT_FOUND:
                    return False
                raise
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        found = []
        with self._errors(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if is_key(key):  # foreign objects with unsafe names are not ours
                        found.append(
                            ObjectInfo(key, obj["Size"], obj["ETag"].strip('"'), obj["LastModified"])
                        )
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        for i in range(0, len(objects), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + info.key} for info in objects[i : i + 1000]]
            with self._errors(prefix):
                errors = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ).get("Errors", [])
            if errors:
                first = errors[0]
                raise StoreError(
                    _one_line(
                        f"could not delete {len(errors)} objects under {self._uri(prefix)}, e.g. "
                        f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}"
                    )
                )
        return len(objects)

    def move(self, src: str, dst: str) -> None:
        source, dest = self._full(src), self._full(dst)
        if source == dest:  # S3 refuses to copy an object onto itself
            if not self.exists(src):
                raise StoreError(f"object not found: {self.uri(src)}")
            return
        with self._errors(src):
            self._client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, dest)
            self._client.delete_object(Bucket=self.bucket, Key=source)


def _timeout(value: float | None, variable: str, default: float) -> float:
    """``value``, else ``$variable``, else ``default``; seconds, positive and finite."""
    if value is None:
        raw = os.environ.get(variable, "").strip()
        try:
            value = float(raw) if raw else default
        except ValueError:
            raise InputError(f"${variable} must be a number of seconds, got {shown(raw)}") from None
    if not 0 < value <= 3600:
        raise InputError(f"S3 timeout must be in (0, 3600] seconds, got {value} ({variable})")
    return value
