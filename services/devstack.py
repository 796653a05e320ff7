"""Starting and stopping a whole Loomis stack as child processes.

One implementation serves ``loomis up``, ``loomis demo``, the tests and the benchmarks, so
what the tests exercise is what users run: a redis-server of our own (unless a Redis URL is
given), the gateway under uvicorn, and one generator worker, each logging to a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Until something listens on the loopback port (a child server that has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StackError(RuntimeError):
    pass


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port``.

    The probe binds with SO_REUSEADDR as uvicorn does, so a stopped stack's sockets left in
    TIME_WAIT do not count as taken.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def port_taken_error(host: str, port: int) -> StackError:
    return StackError(f"port {port} is in use on {host}: stop what listens there or choose "
                      "another port (--port or LOOMIS_GATEWAY__PORT)")


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _popen(argv: list[str], *, log: Path, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def respawn(child: Child) -> None:
    """Start an exited child again: same command, same environment, same log."""
    child.popen = _popen(child.argv, log=child.log, env=child.env)
    child.started = time.monotonic()
    child.restarts += 1


def stop_child(child: Child, *, timeout: float = 15.0) -> None:
    """SIGTERM (arq finishes or abandons its job cleanly), then SIGKILL if it lingers."""
    if not child.alive():
        return
    child.popen.send_signal(signal.SIGTERM)
    try:
        child.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        child.popen.kill()
        child.popen.wait(5)


def start_redis(data_dir: Path, port: int | None = None) -> tuple[Child, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError(
            "redis-server not found: install it (apt-get install -y redis-server) "
            "or point LOOMIS_REDIS__URL at a running Redis"
        )
    port = port or free_port()
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "logs" / "redis.log"
    # The append-only file keeps the queue and live job state across a restart.
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir),
            "--appendonly", "yes", "--save", ""]
    child = Child("redis", _popen(argv, log=log, env=None), log, argv=argv)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return child, f"redis://127.0.0.1:{port}/0"
        if not child.alive():
            break
        time.sleep(0.05)
    stop_child(child)
    raise StackError(f"redis-server did not start:\n{child.tail()}")


@dataclass
class Stack:
    """A gateway, a generator worker and (by default) a private redis-server."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update({
            "LOOMIS_DATA_DIR": str(self.data_dir.resolve()),
            "LOOMIS_GATEWAY__HOST": self.host,
            "LOOMIS_GATEWAY__PORT": str(self.port),
        })
        if self.redis_url:
            env["LOOMIS_REDIS__URL"] = self.redis_url
        env.update(self.env)
        return env

    def _spawn(self, name: str, argv: list[str]) -> Child:
        log = self.data_dir / "logs" / f"{name}.log"
        env = self.child_env()
        child = Child(name, _popen(argv, log=log, env=env), log, argv=argv, env=env)
        self.children.append(child)
        return child

    def start_redis(self) -> None:
        child, self.redis_url = start_redis(self.data_dir)
        self.children.append(child)

    def start_gateway(self) -> Child:
        return self._spawn("gateway", [
            sys.executable, "-m", "uvicorn", "services.gateway.app:create_app", "--factory",
            "--host", self.host, "--port", str(self.port), "--log-level", "warning",
        ])

    def start_worker(self, name: str = "generator") -> Child:
        return self._spawn(name, [sys.executable, "-m", "services.generator"])

    def start_tagger(self, name: str = "tagger") -> Child:
        return self._spawn(name, [sys.executable, "-m", "services.tagger"])

    def start_trainer(self, name: str = "trainer") -> Child:
        return self._spawn(name, [sys.executable, "-m", "services.trainer"])

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for child in self.children:
                if not child.alive():
                    tail = child.tail()
                    if child.name == "gateway" and "address already in use" in tail:
                        raise port_taken_error(self.host, self.port)
                    raise StackError(f"{child.name} exited:\n{tail}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise StackError(f"gateway not ready after {timeout:.0f}s: {last}")

    def wait_worker(self, queue: str = "loomis:queue:generator", timeout: float = 120.0) -> None:
        """Wait for a worker's first health record: it has loaded its model and is polling."""
        import redis

        assert self.redis_url, "no redis"
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if client.exists(f"{queue}:health-check"):
                    return
                for child in self.children:
                    if not child.alive():
                        raise StackError(f"{child.name} exited:\n{child.tail()}")
                time.sleep(0.1)
        finally:
            client.close()
        raise StackError(f"no worker polling {queue} after {timeout:.0f}s")

    def start(self, *, own_redis: bool = True, worker: bool = True, tagger: bool = False,
              trainer: bool = False) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if port_in_use(self.host, self.port):
            raise port_taken_error(self.host, self.port)
        try:
            if own_redis and not self.redis_url:
                self.start_redis()
            self.start_gateway()
            if worker:
                self.start_worker()
            if tagger:
                self.start_tagger()
            if trainer:
                self.start_trainer()
            self.wait_ready()
            if worker:
                self.wait_worker()
            if tagger:
                self.wait_worker("loomis:queue:tagger")
            if trainer:
                self.wait_worker("loomis:queue:trainer")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for child in reversed(self.children):
            stop_child(child)
        self.children.clear()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass
class Supervisor:
    """Keeps every process of a running stack alive, as ``loomis up`` promises.

    A process that exits is started again with the same command: a worker's job is then
    re-delivered to it (or to a peer) once its lease runs out, Redis comes back with its
    append-only file on the same port, and the gateway on the same port. While a process
    keeps failing, the wait before each restart doubles from ``first_delay_s`` up to
    ``max_delay_s``; it starts from the beginning again once the process has stayed up for
    ``healthy_after_s``. Nothing else is stopped.
    """

    stack: Stack
    say: Callable[[str], None]
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    healthy_after_s: float = 60.0
    _delay: dict[str, float] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        """One pass: note what has exited, restart what is due."""
        now = time.monotonic()
        for child in self.stack.children:
            if child.alive():
                if now - child.started >= self.healthy_after_s:
                    self._delay.pop(child.name, None)
                continue
            due = self._due.get(child.name)
            if due is None:
                previous = self._delay.get(child.name)
                delay = (self.first_delay_s if previous is None
                         else min(previous * 2, self.max_delay_s))
                self._delay[child.name] = delay
                self._due[child.name] = now + delay
                self.say(f"{child.name} (pid {child.popen.pid}) exited "
                         f"({_exit_reason(child.popen.returncode)}) after "
                         f"{now - child.started:.1f}s; restarting it in {delay:.0f}s. "
                         f"Last lines of {child.log}:\n{child.tail(10)}")
            elif now >= due:
                del self._due[child.name]
                respawn(child)
                self.say(f"{child.name} restarted (pid {child.popen.pid}, restart "
                         f"{child.restarts})")

    def run(self, *, until: Callable[[], bool], interval_s: float = 0.5) -> None:
        while not until():
            self.check()
            time.sleep(interval_s)
