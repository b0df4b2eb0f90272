"""Shared pytest options, and the check that a compiled run really tests the compiled engine."""

import asyncio
import itertools
import os
import signal
import tomllib
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from indexer.services import Services

# pyproject.toml [tool.quorumbook] native-modules, as module names.
COMPILED_MODULES = tuple(
    path.removesuffix(".py").replace("/", ".")
    for path in tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())[
        "tool"
    ]["quorumbook"]["native-modules"]
)


def pytest_addoption(parser):
    parser.addoption(
        "--rewrite-golden",
        action="store_true",
        default=False,
        help="rewrite the '<' event lines of tests/golden/*.txt from the engine's output",
    )


def pytest_collection_modifyitems(config, items):
    """The tests that start process clusters (tests/integration/) are `slow`: `make
    test-fast` leaves them out for the edit-test loop; `make test` runs everything."""
    for item in items:
        if item.path.parent.name == "integration":
            item.add_marker(pytest.mark.slow)


def pytest_sessionstart(session):
    """QB_NATIVE=1 (make test's second run): the mypyc build of build/native must be the one
    imported, else that run would silently test the pure sources a second time."""
    if os.environ.get("QB_NATIVE") != "1":
        return
    import importlib

    pure = [
        name
        for name in COMPILED_MODULES
        if not importlib.import_module(name).__file__.endswith(".so")
    ]
    if pure:
        pytest.exit(f"QB_NATIVE=1 but not compiled: {', '.join(pure)} (run `make native`)", 2)


# ------------------------------------------------------------------ the embedded services
# PostgreSQL and the Kafka-protocol broker (indexer/services.py), started once per session by
# the first test that asks, stopped by pid at the end. Each test gets its own database and
# topic prefix, so tests do not see each other's rows or messages.

_names = itertools.count(1)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    running = Services.start(tmp_path_factory.mktemp("services"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def pg_url(services: Services) -> str:
    """A fresh, empty database on the session's server."""
    name = f"qb_test_{next(_names)}"

    async def create() -> None:
        conn = await asyncpg.connect(services.postgres.url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return services.postgres.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def topic_prefix() -> str:
    """Topics of this test only (the broker is shared by the session)."""
    return f"qb{next(_names)}"


@pytest.fixture
def kafka_bootstrap(services: Services) -> str:
    return services.kafka.bootstrap


# ------------------------------------------------------------------ an S3-protocol server
# moto's standalone server (a dev extra) on a free loopback port, started once per session by
# the first test that asks, stopped by pid at the end. Each test gets its own bucket.


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import subprocess
    import sys

    from indexer.services import _stop, _wait_for_port, free_port

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    server = Path(sys.executable).parent / "moto_server"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    try:
        _wait_for_port("127.0.0.1", port, process, "moto_server", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process, signal.SIGTERM, 10)


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://BUCKET/prefix` of a new, empty bucket; the AWS variables point boto3 (in this
    process and in those it starts) at the session's server."""
    import boto3

    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"qb-test-{next(_names)}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/backups"
