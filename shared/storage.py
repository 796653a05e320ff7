"""Object storage behind one interface: any S3 endpoint (boto3), or a local directory.

Writes are atomic for readers: the bytes go to a temporary key first and are then moved
into place (S3 copy + delete, ``os.replace`` locally), so nobody sees half an object and a
re-run of a job simply overwrites the same keys. What only the gateway does with objects
(taking uploads as files, signing download links for clients) is on its subclasses of these
stores, ``services/gateway/files/stores.py``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from shared.errors import NotFound, StorageUnavailable
from shared.keys import staging_key


class ObjectStore(ABC):
    @abstractmethod
    async def put(self, key: str, data: bytes, *, content_type: str) -> None: ...

    @abstractmethod
    async def get(self, key: str) -> bytes: ...

    @abstractmethod
    async def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    async def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless reads and writes can work."""


class S3Store(ObjectStore):
    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        create_bucket: bool,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self._create_bucket = create_bucket
        self._bucket_ready = False
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=3,
                read_timeout=30,
            ),
        )

    async def _call(self, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(getattr(self.client, method), **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"object {kwargs.get('Key')!r} not found") from exc
            raise StorageUnavailable(f"S3 {method} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 {method} failed: {exc}") from exc

    async def ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            await self._call("head_bucket", Bucket=self.bucket)
        except (StorageUnavailable, NotFound):
            if not self._create_bucket:
                raise
            await self._call("create_bucket", Bucket=self.bucket)
        self._bucket_ready = True

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        await self.ensure_bucket()
        tmp = staging_key(key)
        await self._call("put_object", Bucket=self.bucket, Key=tmp, Body=data,
                         ContentType=content_type)
        try:
            await self._call("copy_object", Bucket=self.bucket, Key=key,
                             CopySource={"Bucket": self.bucket, "Key": tmp},
                             ContentType=content_type, MetadataDirective="REPLACE")
        finally:
            await self._call("delete_object", Bucket=self.bucket, Key=tmp)

    async def get(self, key: str) -> bytes:
        response = await self._call("get_object", Bucket=self.bucket, Key=key)
        return await asyncio.to_thread(response["Body"].read)

    async def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call("list_objects_v2", **kwargs)
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    async def delete_prefix(self, prefix: str) -> None:
        for key in await self.list(prefix):
            await self._call("delete_object", Bucket=self.bucket, Key=key)

    async def check(self) -> None:
        await self._call("head_bucket", Bucket=self.bucket)


class LocalStore(ObjectStore):
    """A directory that behaves like a bucket, for one-machine installs without an S3 server."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()) or ".." in key.split("/"):
            raise NotFound(f"object {key!r} not found")
        return path

    @staticmethod
    def staging_path(target: Path) -> Path:
        """Where a write lands before ``os.replace`` moves it to ``target``: beside it (one file
        system, so the move is atomic), unique per write, and ending in ``.tmp`` so
        :meth:`list` never shows it."""
        return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        await asyncio.to_thread(self._put, key, data)

    def _put(self, key: str, data: bytes) -> None:
        target = self.path_for(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.staging_path(target)
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {key!r}: {exc}") from exc

    async def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as exc:
            raise NotFound(f"object {key!r} not found") from exc

    async def list(self, prefix: str) -> list[str]:
        def walk() -> list[str]:
            if not self.root.exists():
                return []
            keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
            return sorted(k for k in keys if k.startswith(prefix) and not k.endswith(".tmp"))

        return await asyncio.to_thread(walk)

    async def delete_prefix(self, prefix: str) -> None:
        for key in await self.list(prefix):
            self.path_for(key).unlink(missing_ok=True)

    async def check(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageUnavailable(f"{self.root} is not writable")

        await asyncio.to_thread(probe)
