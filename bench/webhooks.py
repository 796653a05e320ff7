"""Webhooks: deliveries per second from the gateway's dispatcher to a local receiver, and the
latency from a job's terminal event to that receiver, with 1 and 2 gateway replicas, against
a client polling ``GET /v1/jobs/{id}`` every second, measured in the same run.

Starts everything itself: moto's S3 server, a private redis-server and a stack (gateway and
generator worker) on a SQLite file; a second gateway on the same database and Redis is the
second replica. The receiver is a threaded HTTP server on 127.0.0.1 that verifies every
delivery with ``standardwebhooks.Webhook(secret).verify`` and counts each ``webhook-id``.

Throughput: ``--pings`` pings to one endpoint, written due at once in one transaction (rows as
``POST /v1/webhooks/{id}/test`` makes them), so the dispatchers drain a backlog instead of
following a client's submission rate; deliveries/s from the first arrival to the last. The
bare sender beside it posts as many signed messages, 16 at a time on fresh connections as the
dispatcher does: the receiver's ceiling on this machine, with no SQL.

Latency: ``--jobs`` generations (tiny-sd15, 1 step, 64x64) one after another, each with a
per-job webhook and, on the same job, the naive client: a GET every second until the status
is terminal. Both are timed from the job's ``finished_at`` (the worker's terminal event) and
from the moment the gateway applied it (its delivery row's ``created_at``, written in that
transaction) to the receiver's arrival and to the poll that saw it: one machine, one clock.
An idle dispatcher looks for due deliveries every ``dispatch_interval_s`` (printed), which
bounds the latency of an idle gateway. Per replica count the latency series runs first, then
the drain. With 2 gateways a second latency series follows the drain: what a second replica
does for idle latency depends on the offset between the two dispatchers' looks, which chance
sets (when each started, when each last ran out of work), so the two series show two offsets.
With 20 jobs a p50 is good to about +-0.1 s.

    python bench/webhooks.py [--jobs 20] [--pings 200] [--dispatch-interval S]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.devstack import Child, Stack, free_port, stop_child, wait_port  # noqa: E402

SPEC = {"prompt": "a webhook fox", "model": "tiny-sd15", "steps": 1, "width": 64, "height": 64}
TERMINAL = ("succeeded", "failed", "canceled")
POLL_INTERVAL_S = 1.0
BARE_CONCURRENCY = 16  # the dispatcher's: services/gateway/webhooks/dispatcher.py CONCURRENCY
# Not an event the bench's jobs make: the ping endpoint gets pings only.
PING_ONLY_FILTER = "scene.canceled"


def parse_time(value: str) -> datetime:
    """The API's RFC 3339 times; SQLite hands back naive UTC, which is UTC all the same."""
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; with 20 samples p99 is nearly the max."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --------------------------------------------------------------------------- the receiver


@dataclass
class Arrival:
    webhook_id: str
    at: datetime
    mono: float
    payload: dict[str, Any]


@dataclass
class Receiver:
    """Verifies each delivery against the secrets it knows and answers 204; one that verifies
    with none is answered 400 (as a real receiver would) and counted."""

    secrets: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    arrivals: list[Arrival] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        from standardwebhooks import Webhook

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                at, mono = datetime.now(UTC), time.perf_counter()
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = dict(self.headers.items())
                payload = None
                for secret in list(receiver.secrets):
                    try:
                        payload = Webhook(secret).verify(body, headers)
                        break
                    except Exception:  # noqa: BLE001 - the next secret may be the one
                        continue
                with receiver.lock:
                    if payload is None:
                        receiver.unverified.append(headers.get("webhook-id", "?"))
                    else:
                        receiver.arrivals.append(
                            Arrival(headers["webhook-id"], at, mono, payload))
                self.send_response(400 if payload is None else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            # The default backlog of 5 drops SYNs under 16+ concurrent connects, and a dropped
            # SYN is retried after a second: that would be measured as dispatch latency.
            request_queue_size = 256
            daemon_threads = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def of(self, ids: set[str]) -> list[Arrival]:
        with self.lock:
            return [a for a in self.arrivals if a.webhook_id in ids]

    def wait_ids(self, ids: set[str], timeout: float) -> list[Arrival]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.of(ids)
            if {a.webhook_id for a in got} >= ids:
                return got
            time.sleep(0.01)
        got = self.of(ids)
        raise RuntimeError(f"{len(ids - {a.webhook_id for a in got})} of {len(ids)} deliveries "
                           f"did not arrive in {timeout:.0f}s")

    def wait_job(self, job_id: str, timeout: float) -> Arrival:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for arrival in self.arrivals:
                    if arrival.payload.get("data", {}).get("id") == job_id \
                            and arrival.payload.get("type", "").removeprefix("job.") in TERMINAL:
                        return arrival
            time.sleep(0.005)
        raise RuntimeError(f"no terminal webhook for job {job_id} in {timeout:.0f}s")


# --------------------------------------------------------------------------- gateways


def spawn_gateway(stack: Stack, name: str) -> tuple[Child, str]:
    """Another replica: the stack's gateway command and environment on its own port."""
    import httpx

    port = free_port()
    log = stack.data_dir / "logs" / f"{name}.log"
    child = Child(name, subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.gateway.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=stack.child_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT), log)
    wait_port(port, timeout=60)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready:\n{child.tail()}")
        time.sleep(0.1)
    return child, url


def check(response: Any, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text[:2000]}")
    body: dict[str, Any] = response.json() if response.content else {}
    return body


# --------------------------------------------------------------------------- throughput


async def insert_pings(database_url: str, endpoint_id: str, url: str, count: int) -> set[str]:
    """``count`` pings due now, committed together, as ``services.gateway.webhooks.service.ping``
    writes one: the dispatchers see the whole backlog at their next look."""
    from sqlalchemy import insert, select

    from services.gateway.db.models import WebhookDelivery, WebhookEndpoint, new_id, utcnow
    from services.gateway.db.session import make_engine

    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            tenant_id = await conn.scalar(select(WebhookEndpoint.tenant_id).where(
                WebhookEndpoint.id == endpoint_id))
            now = utcnow()
            event_ids = [f"msg_{uuid.uuid4().hex}" for _ in range(count)]
            await conn.execute(insert(WebhookDelivery), [
                {"id": new_id(), "tenant_id": tenant_id, "endpoint_id": endpoint_id,
                 "job_id": None, "url": url, "event_type": "ping", "event_id": event_id,
                 "seq": None, "status": "pending", "attempts": 0, "next_attempt_at": now,
                 "last_attempt_at": None, "created_at": now, "updated_at": now}
                for event_id in event_ids])
    finally:
        await engine.dispose()
    return set(event_ids)


async def delivery_states(database_url: str, event_ids: set[str]) -> Counter[str]:
    """How the gateway recorded them: ``succeeded after 1 attempt(s)`` for each, or not."""
    from sqlalchemy import select

    from services.gateway.db.models import WebhookDelivery
    from services.gateway.db.session import make_engine

    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(WebhookDelivery.status, WebhookDelivery.attempts)
                                       .where(WebhookDelivery.event_id.in_(event_ids)))).all()
    finally:
        await engine.dispose()
    return Counter(f"{status} after {attempts} attempt(s)" for status, attempts in rows)


def exactly_once(arrivals: list[Arrival], ids: set[str]) -> tuple[int, int]:
    """(missing, duplicated) webhook-ids among ``ids``."""
    counts = Counter(a.webhook_id for a in arrivals)
    return len(ids - set(counts)), sum(n - 1 for n in counts.values() if n > 1)


def rate(arrivals: list[Arrival]) -> tuple[float, float]:
    """Deliveries/s between the first and the last arrival, and that span in seconds."""
    times = sorted(a.mono for a in arrivals)
    span = times[-1] - times[0]
    return (len(times) - 1) / span if span > 0 else float("inf"), span


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads: on a shared machine deliveries/s moves
    with the neighbours, CPU per delivery much less."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(*, client: Any, receiver: Receiver, database_url: str, count: int,
          interval_s: float, gateway_pids: list[int]) -> dict[str, Any]:
    """One endpoint, a warm-up ping through the API, then a backlog of ``count`` pings."""
    hook = check(client.post("/v1/webhooks", json={"url": receiver.url,
                                                   "events": [PING_ONLY_FILTER]}), 201)
    receiver.secrets.append(hook["secret"])
    try:
        warm = check(client.post(f"/v1/webhooks/{hook['id']}/test"), 202)
        receiver.wait_ids({warm["event_id"]}, timeout=30)
        cpu_before = sum(cpu_seconds(pid) for pid in gateway_pids)
        ids = asyncio.run(insert_pings(database_url, hook["id"], receiver.url, count))
        receiver.wait_ids(ids, timeout=max(120.0, count / 5))
        deadline = time.monotonic() + 30
        while asyncio.run(delivery_states(database_url, ids)) \
                .get("succeeded after 1 attempt(s)", 0) < count and time.monotonic() < deadline:
            time.sleep(0.05)  # recording the last attempts is part of the work
        cpu = sum(cpu_seconds(pid) for pid in gateway_pids) - cpu_before
        time.sleep(max(2.0, 3 * interval_s))  # anything sent twice would be here by now
        arrivals = receiver.of(ids)
        per_s, span = rate(arrivals)
        missing, duplicated = exactly_once(arrivals, ids)
        states = asyncio.run(delivery_states(database_url, ids))
    finally:
        check(client.delete(f"/v1/webhooks/{hook['id']}"), 204)
    return {"per_s": per_s, "span_s": span, "missing": missing, "duplicated": duplicated,
            "states": states, "cpu_ms": 1000 * cpu / count}


def bare_send(url: str, secret: str, count: int, prefix: str) -> int:
    """The sending half of the bare sender, in a process of its own as the dispatcher is."""
    import httpx
    from standardwebhooks import Webhook

    signer = Webhook(secret)
    body = json.dumps({"type": "ping", "timestamp": datetime.now(UTC).isoformat(),
                       "data": {"endpoint_id": "bare"}}, separators=(",", ":"))

    async def send_all() -> None:
        limit = asyncio.Semaphore(BARE_CONCURRENCY)
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0),
                                     timeout=15) as client:
            async def one(webhook_id: str) -> None:
                async with limit:
                    now = datetime.now(UTC)
                    headers = {"webhook-id": webhook_id,
                               "webhook-timestamp": str(int(now.timestamp())),
                               "webhook-signature": signer.sign(webhook_id, now, body),
                               "content-type": "application/json"}
                    (await client.post(url, content=body, headers=headers)).raise_for_status()

            await asyncio.gather(*(one(f"{prefix}{n}") for n in range(count)))

    asyncio.run(send_all())
    return 0


def bare_sender(receiver: Receiver, count: int) -> dict[str, Any]:
    """The receiver's ceiling: signed POSTs, ``BARE_CONCURRENCY`` at a time, a fresh
    connection each (the dispatcher keeps none alive), no database."""
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    receiver.secrets.append(secret)
    prefix = f"msg_bare_{uuid.uuid4().hex[:8]}_"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--bare-send", receiver.url,
                    secret, str(count), prefix], check=True, cwd=ROOT)
    ids = {f"{prefix}{n}" for n in range(count)}
    arrivals = receiver.wait_ids(ids, timeout=60)
    per_s, span = rate(arrivals)
    missing, duplicated = exactly_once(arrivals, ids)
    return {"per_s": per_s, "span_s": span, "missing": missing, "duplicated": duplicated}


# --------------------------------------------------------------------------- latency


@dataclass
class Known:
    """When each side knew one job had ended, in seconds after ``finished_at`` / applied."""

    webhook_from_finished: float
    webhook_from_applied: float
    poll_from_finished: float
    poll_from_applied: float
    applied_after_finished: float
    attempt: float  # the HTTP attempt alone, as the delivery log times it
    polls: int


def one_job(client: Any, receiver: Receiver, seed: int, rng: random.Random,
            interval_s: float) -> Known:
    """Submit with a per-job webhook; poll every second on the same job until terminal.

    Jobs one after another would keep one phase against the dispatchers' looks (every
    ``interval_s``) and against the polls (a tiny job ends ~0.1 s in, so a poll at +1 s is
    always ~0.9 s late): a random pause before submitting and a random first poll within the
    first second give both the uniform phase that jobs of any length have.
    """
    time.sleep(rng.uniform(0, interval_s))
    submitted = time.monotonic() + rng.uniform(0, POLL_INTERVAL_S) - POLL_INTERVAL_S
    job = check(client.post("/v1/generations", json={**SPEC, "seed": seed,
                                                     "webhook": {"url": receiver.url}}), 202)
    polls = 0
    while True:
        time.sleep(max(0.0, submitted + (polls + 1) * POLL_INTERVAL_S - time.monotonic()))
        seen = check(client.get(f"/v1/jobs/{job['id']}"), 200)
        polls += 1
        if seen["status"] in TERMINAL:
            seen_at = datetime.now(UTC)
            break
        if polls > 120:
            raise RuntimeError(f"job {job['id']} still {seen['status']} after {polls} polls")
    if seen["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {seen['status']}: {json.dumps(seen.get('error'))}")
    arrival = receiver.wait_job(job["id"], timeout=60)
    deadline = time.monotonic() + 30
    while True:  # the gateway records the attempt after the receiver has answered
        deliveries = check(client.get(f"/v1/jobs/{job['id']}/deliveries"), 200)["items"]
        delivery = next(d for d in deliveries if d["event_id"] == arrival.webhook_id)
        if delivery["attempts"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    applied = parse_time(delivery["created_at"])
    finished = parse_time(seen["finished_at"])
    return Known(
        webhook_from_finished=(arrival.at - finished).total_seconds(),
        webhook_from_applied=(arrival.at - applied).total_seconds(),
        poll_from_finished=(seen_at - finished).total_seconds(),
        poll_from_applied=(seen_at - applied).total_seconds(),
        applied_after_finished=(applied - finished).total_seconds(),
        attempt=delivery["attempts"][0]["latency_ms"] / 1000,
        polls=polls)


def latency(client: Any, receiver: Receiver, *, jobs: int, seeds: Any,
            interval_s: float) -> list[Known]:
    rng = random.Random(jobs)
    one_job(client, receiver, next(seeds), rng, interval_s)  # warm-up: lazy imports
    return [one_job(client, receiver, next(seeds), rng, interval_s) for _ in range(jobs)]


# --------------------------------------------------------------------------- the run


def gateway_log_findings(logs: list[Path]) -> list[str]:
    """Errors, tracebacks and webhook warnings the gateways logged (they run at WARNING)."""
    found = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r"ERROR|CRITICAL|Traceback|webhook", line):
                found.append(f"{log.name}: {line}")
    return found


def print_latency(label: str, known: list[Known]) -> None:
    def row(name: str, values: list[float]) -> str:
        return (f"    {name:32} p50 {percentile(values, 50) * 1000:7.0f} ms   "
                f"p99 {percentile(values, 99) * 1000:7.0f} ms   "
                f"max {max(values) * 1000:7.0f} ms")

    print(f"  {label} ({len(known)} jobs)")
    print(row("event applied after finished_at", [k.applied_after_finished for k in known]))
    print(row("webhook, from finished_at", [k.webhook_from_finished for k in known]))
    print(row("webhook, from applied", [k.webhook_from_applied for k in known]))
    print(row("  of which the HTTP attempt", [k.attempt for k in known]))
    print(row("polling 1 s, from finished_at", [k.poll_from_finished for k in known]))
    print(row("polling 1 s, from applied", [k.poll_from_applied for k in known]), flush=True)


def bench(args: argparse.Namespace, workdir: Path) -> int:
    import httpx

    from bench.benchstack import bench_stack
    from shared.settings import WebhookSettings

    interval = args.dispatch_interval or WebhookSettings().dispatch_interval_s
    receiver = Receiver().start()
    seeds = iter(range(1000, 100_000))
    throughput: dict[str, dict[str, Any]] = {}
    known: dict[str, list[Known]] = {}
    second: Child | None = None
    model_cache = (args.model_cache or workdir / "models").resolve()
    with bench_stack(workdir, model_cache=model_cache, worker=True, env={
            # the receiver is http on loopback
            "LOOMIS_WEBHOOKS__ALLOW_HTTP": "true",
            "LOOMIS_WEBHOOKS__ALLOW_PRIVATE_NETWORKS": "true",
            "LOOMIS_WEBHOOKS__DISPATCH_INTERVAL_S": str(interval)}) as running:
        stack, key, database_url = running.stack, running.key, running.database_url
        try:
            print(f"dispatch interval {interval:g} s (LOOMIS_WEBHOOKS__DISPATCH_INTERVAL_S; default "
                  f"{WebhookSettings().dispatch_interval_s:g}); SQLite; {os.cpu_count()} CPUs, "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)
            with httpx.Client(base_url=stack.url, timeout=60,
                              headers={"Authorization": f"Bearer {key}"}) as client:
                receiver.secrets.append(check(client.get("/v1/webhooks/job-secret"), 200)["secret"])
                for replicas in (1, 2):
                    label = f"{replicas} gateway" + ("s" if replicas > 1 else "")
                    if replicas == 2:
                        second, _ = spawn_gateway(stack, "gateway-2")
                    pids = [c.popen.pid for c in [*stack.children, *([second] if second else [])]
                            if c.name.startswith("gateway")]
                    known[label] = latency(client, receiver, jobs=args.jobs, seeds=seeds,
                                           interval_s=interval)
                    print_latency(label, known[label])
                    throughput[label] = drain(client=client, receiver=receiver,
                                              database_url=database_url, count=args.pings,
                                              interval_s=interval, gateway_pids=pids)
                    t = throughput[label]
                    print(f"  {label}: {args.pings} pings drained at {t['per_s']:6.0f} deliveries/s "
                          f"({t['span_s']:.2f} s first to last), gateway CPU {t['cpu_ms']:.1f} "
                          f"ms/delivery; missing {t['missing']}, duplicated {t['duplicated']}; "
                          f"log: {dict(t['states'])}", flush=True)
                    if replicas == 2:
                        after = f"{label}, after the drain"
                        known[after] = latency(client, receiver, jobs=args.jobs, seeds=seeds,
                                               interval_s=interval)
                        print_latency(after, known[after])
            throughput["bare sender"] = bare_sender(receiver, args.pings)
        except Exception:
            if second is not None:
                print(f"last lines of {second.name}'s log:\n{second.tail(40)}", file=sys.stderr)
            raise
        finally:
            if second is not None:
                stop_child(second)
            logs = [c.log for c in stack.children if c.name == "gateway"] + (
                [second.log] if second else [])
            receiver.stop()

    bare = throughput["bare sender"]
    print(f"\ndeliveries/s to the receiver ({args.pings} each, first to last arrival)")
    for label, t in throughput.items():
        share = "" if label == "bare sender" else (
            f"   {t['per_s'] / bare['per_s']:5.2f} x bare   gateway CPU {t['cpu_ms']:4.1f} "
            "ms/delivery")
        print(f"  {label:12} {t['per_s']:7.0f} /s{share}")
    print("  (bare sender: signed POSTs, 16 at a time, fresh connections, no SQL: the "
          "receiver's ceiling)")

    print(f"\nwebhook vs polling every {POLL_INTERVAL_S:g} s (same jobs): time to know a job "
          "ended, from finished_at, polling / webhook (over 1: the webhook knows sooner); client "
          "requests per job")
    for label, ks in known.items():
        hook = [k.webhook_from_finished for k in ks]
        poll = [k.poll_from_finished for k in ks]
        requests = 1 + sum(k.polls for k in ks) / len(ks)  # the submission and the GETs
        print(f"  {label:27} p50 {percentile(poll, 50) / percentile(hook, 50):5.2f} x   "
              f"p99 {percentile(poll, 99) / percentile(hook, 99):5.2f} x   requests: polling "
              f"{requests:.2f}, webhook 1 (+1 delivery received): {requests:.2f} x")
    # The gateway whose event consumer applied the event wakes its own dispatcher after the
    # commit; the interval only bounds deliveries queued by another process.
    print(f"  a gateway wakes its dispatcher when it commits deliveries; the {interval:g} s "
          "interval only bounds those another process queued (e.g. a replica whose dispatcher "
          "is busy)")

    problems = []
    for label, t in throughput.items():
        if t["missing"] or t["duplicated"]:
            problems.append(f"{label}: {t['missing']} missing, {t['duplicated']} duplicated")
    webhook_ids = [a.webhook_id for a in receiver.arrivals
                   if a.payload.get("type", "").startswith("job.")]
    dupes = {i: n for i, n in Counter(webhook_ids).items() if n > 1}
    if dupes:
        problems.append(f"job webhooks delivered more than once: {dupes}")
    if receiver.unverified:
        problems.append(f"{len(receiver.unverified)} deliveries failed verification: "
                        f"{receiver.unverified[:5]}")
    findings = gateway_log_findings(logs)
    print(f"\ngateway logs: {len(findings)} error/webhook line(s)")
    for line in findings[:40]:
        print(f"  {line}")
    print("every webhook-id arrived exactly once and verified: "
          + ("yes" if not problems else "NO\n  " + "\n  ".join(problems)))
    return 0 if not problems else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="timed generations per replica count")
    parser.add_argument("--pings", type=int, default=200, help="pings in each drained backlog")
    parser.add_argument("--dispatch-interval", type=float, default=None,
                        help="LOOMIS_WEBHOOKS__DISPATCH_INTERVAL_S (default: the settings' 1.0)")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where tiny models are built/found (default: a temp dir)")
    parser.add_argument("--bare-send", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_send is not None:
        url, secret, count, prefix = args.bare_send
        return bare_send(url, secret, int(count), prefix)
    with tempfile.TemporaryDirectory(prefix="loomis-bench-webhooks-") as tmp:
        return bench(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
