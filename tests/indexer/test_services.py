"""The embedded services start, answer and stop by pid (indexer/services.py)."""

from __future__ import annotations

import asyncio
import os
import signal

import asyncpg
from aiokafka import AIOKafkaProducer

from indexer.services import Postgres, Services


def test_postgres_and_the_broker_answer(services: Services, pg_url: str) -> None:
    async def go() -> tuple[int, int]:
        conn = await asyncpg.connect(pg_url)
        try:
            one = await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
        producer = AIOKafkaProducer(bootstrap_servers=services.kafka.bootstrap)
        await producer.start()
        try:
            sent = await producer.send_and_wait("qb-services-check", b"x", key=b"k")
        finally:
            await producer.stop()
        return one, sent.offset

    one, offset = asyncio.run(go())
    assert one == 1 and offset >= 0
    manifest = services.manifest_path.read_text()
    assert services.postgres.url in manifest and services.kafka.bootstrap in manifest


def test_a_stopped_postgres_starts_again_with_its_data(tmp_path) -> None:
    server = Postgres.start(tmp_path / "pg")
    try:
        asyncio.run(_execute(server.url, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)"))
        pid = server.pid
        server.stop()
        assert server.process.poll() is not None
        server.run()  # the same port and data directory
        assert server.pid != pid
        assert asyncio.run(_fetch(server.url, "SELECT x FROM kept")) == 7
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert _not_running(server.pid)


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fetch(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _not_running(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIG_DFL)
    except ProcessLookupError:
        return True
    return False
