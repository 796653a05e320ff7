"""Object storage behind one interface: any S3 endpoint (boto3), or a local directory.

Writes are atomic for readers: the bytes go to a temporary key first and are then moved
into place (S3 copy + delete, ``os.replace`` locally), so nobody sees half an object and a
re-run of a job simply overwrites the same keys. Clients download through presigned URLs;
the local backend signs URLs served by the gateway's ``/v1/files`` route.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit

from shared.errors import NotFound, StorageUnavailable
from shared.keys import staging_key
from shared.settings import Settings

_COPY_CHUNK = 1024 * 1024


def _transfer_config() -> Any:
    """Multipart uploads in 5 MiB parts (S3's least), two read ahead and two in flight: about
    what one upload holds in memory (the defaults read ten 8 MiB parts ahead)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=8 * 1024**2, multipart_chunksize=5 * 1024**2,
                            max_concurrency=2, use_threads=True)
    config.max_in_memory_upload_chunks = 2  # s3transfer's option; boto3 does not pass it on
    return config


class ObjectStore(ABC):
    @abstractmethod
    async def put(self, key: str, data: bytes, *, content_type: str) -> None: ...

    @abstractmethod
    async def put_file(self, key: str, file: BinaryIO, *, content_type: str) -> None:
        """Store a file's contents from its start, in chunks: uploads of gigabytes never sit
        in memory whole."""

    @abstractmethod
    async def get(self, key: str) -> bytes: ...

    @abstractmethod
    async def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def presign_get(self, key: str, *, expires_s: int | None = None) -> str: ...

    @abstractmethod
    async def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless reads and writes can work."""


class SigV4Presigner:
    """Presigned GET URLs for a path-style S3 endpoint, signed here rather than by botocore.

    botocore builds a whole request per URL (parameter validation, endpoint rules, event
    hooks): about a millisecond of CPU, forty of them for a page of jobs. The query-string
    form of SigV4 is a few HMACs; ``tests/test_cli_and_storage.py`` checks that both sign
    the same URL byte for byte. Used only where the URL is fully known up front: an explicit
    endpoint and static keys (no session token, no virtual-host addressing).
    """

    def __init__(self, *, endpoint_url: str, region: str, access_key_id: str,
                 secret_access_key: str) -> None:
        parts = urlsplit(endpoint_url)
        default_port = {"http": 80, "https": 443}.get(parts.scheme)
        host = parts.hostname or ""
        self.host = host if parts.port in (None, default_port) else f"{host}:{parts.port}"
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.path_prefix = parts.path.rstrip("/")
        self.region = region
        self.access_key_id = access_key_id
        self.secret = secret_access_key
        self._day_keys: dict[str, bytes] = {}

    def _signing_key(self, day: str) -> bytes:
        key = self._day_keys.get(day)
        if key is None:
            key = ("AWS4" + self.secret).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._day_keys = {day: key}
        return key

    def presign_get(self, bucket: str, key: str, *, expires_s: int,
                    now: datetime | None = None) -> str:
        at = now or datetime.now(UTC)
        stamp, day = at.strftime("%Y%m%dT%H%M%SZ"), at.strftime("%Y%m%d")
        path = f"{self.path_prefix}/{quote(bucket, safe='~')}/{quote(key, safe='/~')}"
        scope = f"{day}/{self.region}/s3/aws4_request"
        query = "&".join(f"{name}={quote(value, safe='-_.~')}" for name, value in (
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Credential", f"{self.access_key_id}/{scope}"),
            ("X-Amz-Date", stamp),
            ("X-Amz-Expires", str(expires_s)),
            ("X-Amz-SignedHeaders", "host"),
        ))
        canonical = f"GET\n{path}\n{query}\nhost:{self.host}\n\nhost\nUNSIGNED-PAYLOAD"
        to_sign = (f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n"
                   + hashlib.sha256(canonical.encode()).hexdigest())
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{self.base}/{quote(bucket, safe='~')}/{quote(key, safe='/~')}?{query}" \
               f"&X-Amz-Signature={signature}"


class S3Store(ObjectStore):
    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        presign_expires_s: int,
        create_bucket: bool,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.presign_expires_s = presign_expires_s
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
        self.presigner = (
            SigV4Presigner(endpoint_url=endpoint_url, region=region,
                           access_key_id=access_key_id, secret_access_key=secret_access_key)
            if endpoint_url and access_key_id and secret_access_key else None
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

    async def put_file(self, key: str, file: BinaryIO, *, content_type: str) -> None:
        # An S3 object (multipart ones included) appears whole or not at all, so unlike put()
        # this needs no temporary key; a copy of gigabytes would double the work.
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        await self.ensure_bucket()
        file.seek(0)
        try:
            await asyncio.to_thread(
                self.client.upload_fileobj, file, self.bucket, key,
                ExtraArgs={"ContentType": content_type}, Config=_transfer_config(),
            )
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise StorageUnavailable(f"S3 upload of {key!r} failed: {exc}") from exc

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

    def presign_get(self, key: str, *, expires_s: int | None = None) -> str:
        if self.presigner is not None:
            return self.presigner.presign_get(self.bucket, key,
                                              expires_s=expires_s or self.presign_expires_s)
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=expires_s or self.presign_expires_s,
        ))

    async def check(self) -> None:
        await self._call("head_bucket", Bucket=self.bucket)


class LocalStore(ObjectStore):
    """A directory that behaves like a bucket, for one-machine installs without an S3 server."""

    def __init__(self, root: Path, *, public_url: str, secret: str, presign_expires_s: int) -> None:
        self.root = root
        self.public_url = public_url
        self._secret = secret.encode()
        self.presign_expires_s = presign_expires_s

    def path_for(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()) or ".." in key.split("/"):
            raise NotFound(f"object {key!r} not found")
        return path

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        await asyncio.to_thread(self._put, key, data)

    def _put(self, key: str, data: bytes) -> None:
        target = self.path_for(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {key!r}: {exc}") from exc

    async def put_file(self, key: str, file: BinaryIO, *, content_type: str) -> None:
        await asyncio.to_thread(self._put_file, key, file)

    def _put_file(self, key: str, file: BinaryIO) -> None:
        target = self.path_for(key)
        file.seek(0)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                with tmp.open("wb") as out:
                    shutil.copyfileobj(file, out, _COPY_CHUNK)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
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

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(self.signature(key, expires), signature)

    def presign_get(self, key: str, *, expires_s: int | None = None) -> str:
        expires = int(time.time()) + (expires_s or self.presign_expires_s)
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return f"{self.public_url}/v1/files/{quote(key)}?{query}"

    async def check(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageUnavailable(f"{self.root} is not writable")

        await asyncio.to_thread(probe)


def build_store(settings: Settings) -> ObjectStore:
    cfg = settings.storage
    if cfg.backend == "s3":
        return S3Store(
            bucket=cfg.bucket,
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            access_key_id=cfg.access_key_id.get_secret_value() if cfg.access_key_id else None,
            secret_access_key=(
                cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None
            ),
            presign_expires_s=cfg.presign_expires_s,
            create_bucket=cfg.create_bucket,
        )
    return LocalStore(
        settings.storage_root,
        public_url=settings.public_url,
        secret=settings.gateway.signing_secret.get_secret_value(),
        presign_expires_s=cfg.presign_expires_s,
    )
