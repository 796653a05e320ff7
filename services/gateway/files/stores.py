"""The gateway's object stores: the shared ones, plus what only the gateway does with objects.

Workers write what they make and read what they are given (:mod:`shared.storage`). Only the
gateway takes uploads of gigabytes as files (LoRAs, sent in parts, never held whole) and gives
clients download links, so those two live here, on subclasses of the shared stores. Clients
download through presigned URLs; the local backend signs URLs served by the gateway's
``/v1/files`` route (``routes.py`` beside this module).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import shutil
import time
from abc import abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit

from shared import storage
from shared.errors import StorageUnavailable
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


class GatewayStore(storage.ObjectStore):
    @abstractmethod
    async def put_file(self, key: str, file: BinaryIO, *, content_type: str) -> None:
        """Store a file's contents from its start, in chunks: uploads of gigabytes never sit
        in memory whole."""

    @abstractmethod
    def presign_get(self, key: str, *, expires_s: int | None = None) -> str: ...


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


class S3Store(storage.S3Store, GatewayStore):
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
        super().__init__(bucket=bucket, endpoint_url=endpoint_url, region=region,
                         access_key_id=access_key_id, secret_access_key=secret_access_key,
                         create_bucket=create_bucket)
        self.presign_expires_s = presign_expires_s
        self.presigner = (
            SigV4Presigner(endpoint_url=endpoint_url, region=region,
                           access_key_id=access_key_id, secret_access_key=secret_access_key)
            if endpoint_url and access_key_id and secret_access_key else None
        )

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

    def presign_get(self, key: str, *, expires_s: int | None = None) -> str:
        if self.presigner is not None:
            return self.presigner.presign_get(self.bucket, key,
                                              expires_s=expires_s or self.presign_expires_s)
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=expires_s or self.presign_expires_s,
        ))


class LocalStore(storage.LocalStore, GatewayStore):
    def __init__(self, root: Path, *, public_url: str, secret: str, presign_expires_s: int) -> None:
        super().__init__(root)
        self.public_url = public_url
        self._secret = secret.encode()
        self.presign_expires_s = presign_expires_s

    async def put_file(self, key: str, file: BinaryIO, *, content_type: str) -> None:
        await asyncio.to_thread(self._put_file, key, file)

    def _put_file(self, key: str, file: BinaryIO) -> None:
        target = self.path_for(key)
        file.seek(0)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.staging_path(target)
            try:
                with tmp.open("wb") as out:
                    shutil.copyfileobj(file, out, _COPY_CHUNK)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {key!r}: {exc}") from exc

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(self.signature(key, expires), signature)

    def presign_get(self, key: str, *, expires_s: int | None = None) -> str:
        expires = int(time.time()) + (expires_s or self.presign_expires_s)
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return f"{self.public_url}/v1/files/{quote(key)}?{query}"


def build_store(settings: Settings) -> GatewayStore:
    """The gateway's store on the configured backend (a worker builds the shared one)."""
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
