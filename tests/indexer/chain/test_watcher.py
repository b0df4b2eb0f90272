"""The watcher's step on a real chain (anvil), a real cluster and PostgreSQL: a deposit to an
address assigned through the cluster is credited once it is N blocks deep, exactly once
across a restart of the watcher and a resent credit; a reorg before confirmation credits the
new fork's deposit and never the old fork's; every observed deposit is in the table with its
final status."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from api.sdk import AdminClient
from cluster.launcher import LocalCluster
from indexer.chain.anvil import Anvil
from indexer.chain.scanner import Asset
from indexer.chain.store import ChainStore
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


def test_credited_once_n_blocks_deep_across_a_restart_and_a_reorg(world, pg_url) -> None:
    anvil, cluster = world
    url = cluster.api_urls()[0]
    alice, bob = anvil.accounts[1], anvil.accounts[2]
    chain = Chain(anvil.chain_id, confirmations=3, assets=(ETH,),
                  start_block=anvil.rpc.block_number() + 1)  # fmt: skip

    opened: list[ChainStore] = []

    async def connect() -> ChainStore:
        opened.append(await ChainStore.connect(pg_url))
        return opened[-1]

    async def run() -> None:
        try:
            await scenario()
        finally:
            for store in opened:
                await store.close()

    async def scenario() -> None:
        with AdminClient([url], cluster.admin_credentials()) as admin:
            admin.assign_deposit_address("alice", anvil.chain_id, alice)
            admin.assign_deposit_address("bob", anvil.chain_id, bob)
            store = await connect()
            watcher = Watcher(anvil.rpc, store, admin, url, chain)
            sender = anvil.accounts[9]

            anvil.send(sender, alice, value=5 * 10**18 + 7)
            anvil.mine()
            step = await watcher.step()
            assert [d.account for d in step.poll.seen] == ["alice"] and step.credited == []
            anvil.mine()
            assert (await watcher.step()).credited == []
            assert balance(admin, url, "alice") == 0

            # A new watcher from the same database (a restart) credits it at depth 3, once.
            store = await connect()  # the first one's connection is closed at the end
            watcher = Watcher(anvil.rpc, store, admin, url, chain)
            anvil.mine()
            [credited] = (await watcher.step()).credited
            assert (credited.account, credited.amount) == ("alice", 5 * 10**9)
            assert balance(admin, url, "alice") == 5 * 10**9
            # The same credit sent again (a lost answer, a second watcher): applied once.
            await store.conn.execute("UPDATE chain_deposits SET status = 'confirmed'")
            [again] = (await watcher.step()).credited
            assert again.ref == credited.ref
            assert balance(admin, url, "alice") == 5 * 10**9

            # A reorg before confirmation: the old fork's deposit to bob is never credited.
            fork_point = anvil.snapshot()
            old = anvil.send(sender, bob, value=10**18)
            anvil.mine()
            assert [d.tx_hash for d in (await watcher.step()).poll.seen] == [old]
            anvil.revert(fork_point)
            new = anvil.send(sender, bob, value=2 * 10**18)
            anvil.mine(3)
            step = await watcher.step()
            assert [d.tx_hash for d in step.poll.orphaned] == [old]
            assert [d.tx_hash for d in step.credited] == [new]
            assert balance(admin, url, "bob") == 2 * 10**9

            rows = {r["tx_hash"]: r for r in await store.deposits(anvil.chain_id)}
            assert rows[old]["status"] == "orphaned"
            assert rows[new]["status"] == rows[credited.tx_hash]["status"] == "credited"
            assert rows[credited.tx_hash]["dust"] == 7

    asyncio.run(run())
