"""A small HTTP client for the gateway, used by the CLI, the demo and the benchmarks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

TERMINAL = {"succeeded", "failed", "canceled"}


class ApiError(RuntimeError):
    def __init__(self, response: httpx.Response) -> None:
        try:
            body = response.json()
            message = f"{body.get('title')}: {body.get('detail')}"
            for err in body.get("errors") or []:
                message += f"\n  - {err.get('field')}: {err.get('message')}"
        except ValueError:
            message = response.text
        super().__init__(f"HTTP {response.status_code} {message}")
        self.status = response.status_code


class LoomisClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def close(self) -> None:
        self.http.close()

    def _check(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise ApiError(response)
        return response.json()  # type: ignore[no-any-return]

    def submit_generation(
        self, spec: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/generations", json=spec, headers=headers))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}"))

    def events(self, job_id: str, *, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Yield the job's events until it ends (Server-Sent Events)."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        with connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events", headers=headers,
                         timeout=httpx.Timeout(30.0, read=60.0)) as source:
            if source.response.status_code >= 400:
                source.response.read()
                raise ApiError(source.response)
            for sse in source.iter_sse():
                if not sse.data:  # keep-alive comments carry no event
                    continue
                event = json.loads(sse.data)
                yield event
                if event["status"] in TERMINAL:
                    return

    def wait(
        self, job_id: str, *, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        for event in self.events(job_id):
            if on_event:
                on_event(event)
        return self.get_job(job_id)

    def download(self, url: str, target: Path) -> Path:
        """Fetch a presigned URL (no API key: the signature is the credential)."""
        with httpx.stream("GET", url, timeout=60) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        return target
