"""The deposit scanner on a real chain (anvil, blocks mined on demand): deposits seen, then
confirmed N blocks deep, exactly once; reorgs before confirmation orphan the old fork's and
find the new fork's, an equal-height replacement included; a reorg as deep as the
confirmation depth stops it loudly; a transfer that reverted is no deposit; ERC-20 and ETH."""

from __future__ import annotations

import dataclasses

import pytest

from indexer.chain.anvil import Anvil
from indexer.chain.rpc import BadChainData
from indexer.chain.scanner import (
    CONFIRMED,
    ORPHANED,
    SEEN,
    Asset,
    DeepReorg,
    Scanner,
    credit_ref,
)

ETH = Asset("ETH", decimals=18, asset_decimals=9)  # exchange units: gwei
DEPOSITOR = 9  # anvil's account index that sends the deposits


def scanner(chain: Anvil, *, confirmations: int = 3, assets=(ETH,), start: int | None = None):
    return Scanner(
        chain.rpc,
        chain_id=chain.chain_id,
        confirmations=confirmations,
        addresses={chain.accounts[1]: "alice", chain.accounts[2]: "bob"},
        assets=assets,
        start=chain.rpc.block_number() + 1 if start is None else start,
    )


def test_a_deposit_is_seen_then_confirmed_n_blocks_deep_once(chain: Anvil) -> None:
    s = scanner(chain, confirmations=3)
    s.check_chain()
    tx = chain.send(chain.accounts[DEPOSITOR], chain.accounts[1], value=2 * 10**18 + 5)
    chain.mine()
    first = s.poll()
    [seen] = first.seen
    assert (seen.status, seen.account, seen.asset) == (SEEN, "alice", "ETH")
    assert (seen.amount, seen.dust, seen.raw) == (2 * 10**9, 5, 2 * 10**18 + 5)
    assert seen.ref == credit_ref(chain.chain_id, tx, None) and seen.tx_hash == tx
    assert len(seen.ref) <= 64 and seen.ref.endswith(":n")  # the exchange's refs: 1-64 chars
    assert first.confirmed == []
    chain.mine()
    assert s.poll().confirmed == []  # 2 deep
    chain.mine()
    third = s.poll()
    assert [(d.ref, d.status) for d in third.confirmed] == [(seen.ref, CONFIRMED)]
    chain.mine(3)
    later = s.poll()
    assert later.seen == later.confirmed == later.orphaned == []
    assert later.indexed_to == later.head


def test_erc20_transfers_to_deposit_addresses_only(chain: Anvil) -> None:
    token = chain.deploy_token()
    qtd = Asset("QTD", decimals=6, asset_decimals=2, token=token)
    s = scanner(chain, confirmations=1, assets=(ETH, qtd))
    owner = chain.accounts[0]
    chain.transfer_token(token, owner, chain.accounts[2], 1_234_567)  # 1.234567 QTD to bob
    chain.transfer_token(token, owner, chain.accounts[5], 999)  # not a deposit address
    chain.send(chain.accounts[DEPOSITOR], chain.accounts[1], value=10**9)  # 1 gwei to alice
    chain.mine()
    result = s.poll()
    by_asset = {d.asset: d for d in result.seen}
    assert set(by_asset) == {"QTD", "ETH"}
    assert (by_asset["QTD"].account, by_asset["QTD"].amount, by_asset["QTD"].dust) == (
        "bob",
        123,  # the exchange keeps 2 decimals: 1.23 QTD
        4567,  # 0.004567 QTD below that: recorded, never credited
    )
    qtd_deposit = by_asset["QTD"]
    assert qtd_deposit.ref == credit_ref(chain.chain_id, qtd_deposit.tx_hash, qtd_deposit.log_index)
    assert (by_asset["ETH"].account, by_asset["ETH"].amount) == ("alice", 1)
    assert {d.ref for d in result.confirmed} == {d.ref for d in result.seen}


def test_a_transfer_that_reverted_is_no_deposit(chain: Anvil) -> None:
    token = chain.deploy_token()
    s = Scanner(chain.rpc, chain_id=chain.chain_id, confirmations=1,
                addresses={token: "contract"}, assets=(ETH,),
                start=chain.rpc.block_number() + 1)  # fmt: skip
    # The token has no payable default function: value sent to it reverts, in a block.
    tx = chain.send(chain.accounts[DEPOSITOR], token, value=10**18, gas=100_000)
    chain.mine()
    assert chain.receipt(tx)["status"] == "0x0"
    assert s.poll().seen == []


def test_a_reorg_before_confirmation_orphans_the_old_fork_and_finds_the_new(chain: Anvil):
    s = scanner(chain, confirmations=3)
    fork_point = chain.snapshot()
    old = chain.send(chain.accounts[DEPOSITOR], chain.accounts[1], value=10**18)
    chain.mine()
    [seen] = s.poll().seen
    assert seen.tx_hash == old
    chain.revert(fork_point)  # the block is gone; another fork, one block longer
    new = chain.send(chain.accounts[DEPOSITOR], chain.accounts[2], value=3 * 10**18)
    chain.mine(2)
    result = s.poll()
    assert [(d.tx_hash, d.status) for d in result.orphaned] == [(old, ORPHANED)]
    assert result.reorg_depth == 1
    # The tip re-check found the reorg first: the same poll indexes the new fork.
    assert [(d.tx_hash, d.account) for d in result.seen] == [(new, "bob")]
    chain.mine()
    confirmed = s.poll().confirmed
    assert [d.tx_hash for d in confirmed] == [new]  # the old fork's never


def test_an_equal_height_replacement_is_seen_by_rechecking_the_tip(chain: Anvil) -> None:
    s = scanner(chain, confirmations=3)
    fork_point = chain.snapshot()
    old = chain.send(chain.accounts[DEPOSITOR], chain.accounts[1], value=10**18)
    height = chain.mine()
    assert [d.tx_hash for d in s.poll().seen] == [old]
    chain.revert(fork_point)
    # The same height again, with another transaction first (so another hash).
    chain.send(chain.accounts[DEPOSITOR], chain.accounts[3], value=1)
    assert chain.mine() == height
    result = s.poll()
    assert [d.tx_hash for d in result.orphaned] == [old]
    assert result.reorg_depth == 1


def test_a_reorg_as_deep_as_the_confirmation_depth_stops_loudly(chain: Anvil) -> None:
    s = scanner(chain, confirmations=2)
    fork_point = chain.snapshot()
    chain.send(chain.accounts[DEPOSITOR], chain.accounts[1], value=10**18)
    chain.mine(2)
    first = s.poll()
    assert [d.status for d in first.confirmed] == [CONFIRMED]
    chain.revert(fork_point)
    chain.send(chain.accounts[DEPOSITOR], chain.accounts[3], value=1)
    chain.mine(3)
    with pytest.raises(DeepReorg, match=r"2 blocks deep.*confirmation depth 2") as raised:
        s.poll()
    assert raised.value.depth == 2


def test_a_node_of_another_chain_is_refused(chain: Anvil) -> None:
    s = Scanner(chain.rpc, chain_id=1, confirmations=1, addresses={}, assets=(ETH,), start=0)
    with pytest.raises(BadChainData, match=f"serves chain {chain.chain_id}, not 1"):
        s.check_chain()


def test_a_pending_deposit_whose_block_is_not_indexed_is_never_confirmed(chain: Anvil) -> None:
    """A deposit read back as pending (from the database) whose block hash is not the one the
    scanner indexed at that height (an older fork's, or a checkpoint an operator reset) is
    orphaned, not confirmed; if its transaction is on the chain, indexing finds it again."""
    s = scanner(chain, confirmations=2)
    tx = chain.send(chain.accounts[DEPOSITOR], chain.accounts[1], value=10**18)
    chain.mine()
    [seen] = s.poll().seen
    stale = dataclasses.replace(seen, ref="stale-ref", block_hash="0x" + "ee" * 32)
    s.pending[stale.ref] = stale
    chain.mine()
    result = s.poll()
    assert [d.ref for d in result.orphaned] == ["stale-ref"]
    assert [d.tx_hash for d in result.confirmed] == [tx]  # the real one, verified
