"""The watcher's step on a real chain (anvil), a real cluster and PostgreSQL: a deposit to an
address assigned through the cluster is credited once it is N blocks deep, exactly once
across a restart of the watcher and a resent credit; a reorg before confirmation credits the
new fork's deposit and never the old fork's; every observed deposit is in the table with its
final status."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from api.sdk import AdminClient
from cluster.launcher import LocalCluster
from indexer.chain.anvil import Anvil
from indexer.chain.publish import DepositTopic
from indexer.chain.rpc import EthRpc
from indexer.chain.scanner import Asset
from indexer.chain.store import ChainLease, ChainStore, Fenced
from indexer.chain.watcher import Chain, Watcher

pytestmark = pytest.mark.slow

ETH = Asset("ETH", decimals=18, asset_decimals=9)


@pytest.fixture
def world(tmp_path, pg_url) -> Iterator[tuple[Anvil, LocalCluster]]:
    with Anvil() as anvil:
        cluster = LocalCluster.create(tmp_path / "cluster", 1)
        cluster.exit_with_launcher = True
        try:
            cluster.start()
            cluster.wait_all_following(30)
            yield anvil, cluster
        finally:
            cluster.stop_all()


def balance(admin: AdminClient, url: str, account: str) -> int:
    rows = admin.balances(url, account)["balances"]
    return sum(r["available"] for r in rows if r["asset"] == "ETH")


async def read_topic(bootstrap: str, topic: str) -> list[dict]:
    """Every record of the topic, in order, copies included."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = []
        while fetched := await consumer.getmany(timeout_ms=1000):
            for batch in fetched.values():
                records += [orjson.loads(r.value) | {"key": r.key.decode()} for r in batch]
        return records
    finally:
        await consumer.stop()


def test_credited_once_n_blocks_deep_across_a_restart_and_a_reorg(
    world, pg_url, kafka_bootstrap, topic_prefix
) -> None:
    anvil, cluster = world
    url = cluster.api_urls()[0]
    alice, bob = anvil.accounts[1], anvil.accounts[2]
    chain = Chain(anvil.chain_id, confirmations=3, assets=(ETH,),
                  start_block=anvil.rpc.block_number() + 1)  # fmt: skip

    opened: list[ChainStore] = []

    async def connect() -> ChainStore:
        opened.append(await ChainStore.connect(pg_url))
        return opened[-1]

    topics: list[DepositTopic] = []

    async def run() -> None:
        try:
            topics.append(await DepositTopic.connect(kafka_bootstrap, prefix=topic_prefix))
            await scenario()
        finally:
            for store in opened:
                await store.close()
            for topic in topics:
                await topic.close()

    async def scenario() -> None:
        with AdminClient([url], cluster.admin_credentials()) as admin:
            admin.assign_deposit_address("alice", anvil.chain_id, alice)
            admin.assign_deposit_address("bob", anvil.chain_id, bob)
            store = await connect()
            lease = await store.try_acquire(anvil.chain_id, "n1", 60)
            assert lease is not None
            watcher = Watcher(anvil.rpc, store, admin, url, chain, topics[0])
            sender = anvil.accounts[9]

            anvil.send(sender, alice, value=5 * 10**18 + 7)
            anvil.mine()
            step = await watcher.step(lease)
            assert [d.account for d in step.poll.seen] == ["alice"] and step.credited == []
            anvil.mine()
            assert (await watcher.step(lease)).credited == []
            assert balance(admin, url, "alice") == 0

            # A new watcher from the same database (a restart) credits it at depth 3, once.
            store = await connect()  # the first one's connection is closed at the end
            watcher = Watcher(anvil.rpc, store, admin, url, chain, topics[0])
            anvil.mine()
            [credited] = (await watcher.step(lease)).credited
            assert (credited.account, credited.amount) == ("alice", 5 * 10**9)
            assert balance(admin, url, "alice") == 5 * 10**9
            # The same credit sent again (a lost answer, a second watcher): applied once.
            await store.conn.execute("UPDATE chain_deposits SET status = 'confirmed'")
            [again] = (await watcher.step(lease)).credited
            assert again.ref == credited.ref
            assert balance(admin, url, "alice") == 5 * 10**9

            # A reorg before confirmation: the old fork's deposit to bob is never credited.
            fork_point = anvil.snapshot()
            old = anvil.send(sender, bob, value=10**18)
            anvil.mine()
            assert [d.tx_hash for d in (await watcher.step(lease)).poll.seen] == [old]
            anvil.revert(fork_point)
            new = anvil.send(sender, bob, value=2 * 10**18)
            anvil.mine(3)
            step = await watcher.step(lease)
            assert [d.tx_hash for d in step.poll.orphaned] == [old]
            assert [d.tx_hash for d in step.credited] == [new]
            assert balance(admin, url, "bob") == 2 * 10**9

            rows = {r["tx_hash"]: r for r in await store.deposits(anvil.chain_id)}
            assert rows[old]["status"] == "orphaned"
            assert rows[new]["status"] == rows[credited.tx_hash]["status"] == "credited"
            assert rows[credited.tx_hash]["dust"] == 7

            # Kafka has every observed deposit; the last status of each is the table's.
            records = await read_topic(kafka_bootstrap, topics[0].topic)
            last = {r["key"]: r for r in records}
            assert {r["ref"]: r["status"] for r in last.values()} == {
                r["ref"]: r["status"] for r in rows.values()
            }
            assert last[rows[credited.tx_hash]["ref"]]["raw"] == str(5 * 10**18 + 7)
            statuses = [r["status"] for r in records if r["tx_hash"] == new]
            assert statuses[0] == "seen" and statuses[-1] == "credited"

    asyncio.run(run())


def test_one_watcher_per_chain_and_a_takeover_from_the_checkpoint(world, pg_url) -> None:
    """Two watchers run: only the lease holder writes and credits; when it dies without giving
    its lease up, the other takes over from the checkpoint once the lease expires, and every
    deposit is credited exactly once. A writer whose lease was taken over is fenced."""
    anvil, cluster = world
    url = cluster.api_urls()[0]
    chain = Chain(anvil.chain_id, confirmations=2, assets=(ETH,),
                  start_block=anvil.rpc.block_number() + 1)  # fmt: skip

    async def scenario(stores: list[ChainStore]) -> None:
        with AdminClient([url], cluster.admin_credentials()) as admin:
            admin.assign_deposit_address("alice", anvil.chain_id, anvil.accounts[1])
            for _ in range(3):  # two watchers' and the test's own
                stores.append(await ChainStore.connect(pg_url))
            watchers = [Watcher(anvil.rpc, st, admin, url, chain) for st in stores[:2]]
            observer = stores[2]
            stops = [asyncio.Event(), asyncio.Event()]
            tasks = [
                asyncio.create_task(w.run(f"n{i}", stop, poll_s=0.05, lease_ttl_s=1.0))
                for i, (w, stop) in enumerate(zip(watchers, stops, strict=True))
            ]

            async def credited(n: int) -> None:
                for _ in range(400):
                    rows = await observer.deposits(anvil.chain_id)
                    if sum(r["status"] == "credited" for r in rows) >= n:
                        return
                    anvil.mine()
                    await asyncio.sleep(0.05)
                raise AssertionError(f"not {n} credits: {rows}")

            anvil.send(anvil.accounts[9], anvil.accounts[1], value=10**18)
            anvil.mine()
            await credited(1)
            holder = await observer.conn.fetchrow("SELECT holder, epoch FROM chain_leases")
            first = int(holder["holder"][1:])
            # The holder dies without giving its lease up (its connection cut, its task gone):
            # the other takes over once the lease expires.
            stores[first].conn.terminate()
            tasks[first].cancel()
            await asyncio.gather(tasks[first], return_exceptions=True)
            anvil.send(anvil.accounts[9], anvil.accounts[1], value=2 * 10**18)
            anvil.mine()
            await credited(2)
            after = await observer.conn.fetchrow("SELECT holder, epoch FROM chain_leases")
            assert after["holder"] == f"n{1 - first}" and after["epoch"] > holder["epoch"]
            stops[1 - first].set()
            await tasks[1 - first]
            assert balance(admin, url, "alice") == 3 * 10**9

            # A writer holding an old epoch writes nothing.
            stale = ChainLease(anvil.chain_id, f"n{first}", holder["epoch"])
            with pytest.raises(Fenced):
                await observer.credited(stale, "x", None)

    async def run() -> None:
        stores: list[ChainStore] = []
        try:
            await scenario(stores)
        finally:
            for store in stores:
                await store.close()

    asyncio.run(run())


def test_a_cluster_with_chain_configured_credits_deposits_through_its_watcher(
    tmp_path, pg_url, kafka_bootstrap, topic_prefix
) -> None:
    """End to end, as an operator runs it: `[chain]` in every node's config, one watcher
    active among the three (the others standby), a deposit to an assigned address credited
    once it is deep enough, the node status showing it."""
    with Anvil() as anvil:
        cluster = LocalCluster.create(
            tmp_path / "cluster", 3,
            postgres_url=pg_url, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix,
            rpc_url=anvil.url, chain_id=anvil.chain_id, confirmations=2, poll_interval_s=0.1,
            watcher_lease_ttl_s=6.0, start_block=anvil.rpc.block_number() + 1,
            assets=[{"asset": "ETH", "decimals": 18, "asset_decimals": 9}],
        )  # fmt: skip
        cluster.exit_with_launcher = True
        try:
            cluster.start()
            cluster.wait_all_following(30)
            with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as admin:
                admin.assign_deposit_address("alice", anvil.chain_id, anvil.accounts[1])
                anvil.send(anvil.accounts[9], anvil.accounts[1], value=3 * 10**18)
                anvil.mine()
                deadline = time.monotonic() + 30
                while balance(admin, cluster.api_urls()[0], "alice") == 0:
                    assert time.monotonic() < deadline, cluster.statuses()
                    anvil.mine()
                    time.sleep(0.2)
                assert balance(admin, cluster.api_urls()[0], "alice") == 3 * 10**9
                # One watcher active, the others standby (statuses come every 0.5 s).
                while True:
                    chains = [s["chain"] for s in cluster.statuses().values() if s]
                    states = sorted(c["state"] for c in chains)
                    if states == ["active", "standby", "standby"]:
                        break
                    assert time.monotonic() < deadline, chains
                    time.sleep(0.1)
                assert {c["chain_id"] for c in chains} == {anvil.chain_id}
                assert sum(c.get("credited", 0) for c in chains) == 1  # once, by whichever led
                metrics = [httpx.get(u + "/metrics", timeout=5).text for u in cluster.api_urls()]
                assert sum("qb_chain_active 1.0" in m for m in metrics) == 1
                assert sum("qb_chain_deposits_credited_total 1.0" in m for m in metrics) == 1
        finally:
            cluster.stop_all()


def test_the_chain_node_away_and_back_loses_nothing(world, pg_url) -> None:
    """The chain node stops answering (SIGSTOP: every call times out): the watcher says so
    (`retrying`, the error) and backs off; when it answers again, the deposits of the blocks
    mined meanwhile are credited, once."""
    anvil, cluster = world
    url = cluster.api_urls()[0]
    chain = Chain(anvil.chain_id, confirmations=2, assets=(ETH,),
                  start_block=anvil.rpc.block_number() + 1)  # fmt: skip

    async def scenario(store: ChainStore) -> None:
        with AdminClient([url], cluster.admin_credentials()) as admin, \
                EthRpc(anvil.url, timeout_s=0.3) as rpc:  # fmt: skip
            admin.assign_deposit_address("alice", anvil.chain_id, anvil.accounts[1])
            watcher = Watcher(rpc, store, admin, url, chain)
            stop = asyncio.Event()
            task = asyncio.create_task(
                watcher.run("n1", stop, poll_s=0.05, lease_ttl_s=5.0, backoff_max_s=0.5)
            )
            anvil.send(anvil.accounts[9], anvil.accounts[1], value=10**18)
            os.kill(anvil.process.pid, signal.SIGSTOP)
            try:
                for _ in range(100):
                    if watcher.status["state"] == "retrying":
                        break
                    await asyncio.sleep(0.05)
                assert watcher.status["state"] == "retrying", watcher.status
                assert "ChainUnavailable" in watcher.status["last_error"]
            finally:
                os.kill(anvil.process.pid, signal.SIGCONT)
            anvil.mine(2)
            for _ in range(200):
                if watcher.status.get("credited") == 1:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await task
            assert watcher.status["credited"] == 1 and watcher.status["last_error"] is None
            assert balance(admin, url, "alice") == 10**9

    async def run() -> None:
        store = await ChainStore.connect(pg_url)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(run())
