"""Chain watcher benchmark: deposits indexed per second against the chain node's own ceiling.

    .venv/bin/python -m bench.chain [--blocks N] [--per-block K] [--runs R]

One anvil node (npm `@foundry-rs/anvil`, `--no-mining`), on a free loopback port, stopped by
pid on every path. Set-up, not timed: the test token deployed (Token.json), then `--blocks`
blocks of `--per-block` transfers each, half native ETH and half ERC-20 `transfer`s of the
token, every one to one of 20 deposit addresses (sent in JSON-RPC batches from anvil's
unlocked accounts, then `evm_mine`).

Then, `--runs` times, alternating:
1. Ceiling (the peer): a bare loop over those blocks of `eth_getBlockByNumber` (full
   transactions) + `eth_getLogs` (the block's hash, the token, the Transfer topic), the JSON
   decoded and nothing else, through the same HTTP client: transfers/s the node can hand out.
2. Scanner: `indexer.chain.scanner.Scanner.poll` from the first of those blocks to the last
   (confirmations 1: each deposit is seen and confirmed by the poll that reads its block),
   everything it does included: every answer parsed and checked, the parent-hash chain, the
   native transfers' receipts (did it succeed), the amounts converted: deposits/s.
The median of each, and the ratio. Target: scanner >= 70% of the ceiling.

Not included: crediting through the cluster and recording in PostgreSQL and Kafka (the
watcher's step after the poll), which `tests/indexer/chain/test_watcher.py` covers for
correctness; their cost is the cluster's and the indexer's (bench/replication.py,
bench/indexer.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import httpx

from indexer.chain.anvil import TRANSFER_SELECTOR, Anvil
from indexer.chain.rpc import TRANSFER_TOPIC, EthRpc
from indexer.chain.scanner import Asset, Scanner

TARGET = 0.70
ADDRESSES = 20  # deposit addresses the transfers go to
SENDERS = 4  # anvil accounts that send them (0-3; the deposit addresses are fresh)
ETH = Asset("ETH", decimals=18, asset_decimals=9)


def deposit_addresses() -> list[str]:
    return [f"0x{0xD0 + i:02x}" + "00" * 18 + f"{i + 1:02x}" for i in range(ADDRESSES)]


def make_blocks(chain: Anvil, token: str, blocks: int, per_block: int) -> tuple[int, int]:
    """Mine `blocks` blocks of `per_block` deposits each; (first, last) block number."""
    to = deposit_addresses()
    senders = chain.accounts[:SENDERS]
    first = chain.rpc.block_number() + 1
    n = 0
    for _ in range(blocks):
        batch = []
        for i in range(per_block):
            sender, receiver = senders[n % SENDERS], to[n % ADDRESSES]
            if i % 2:
                data = "0x" + TRANSFER_SELECTOR + receiver[2:].rjust(64, "0") + f"{n + 1:064x}"
                tx = {"from": sender, "to": token, "data": data, "gas": hex(100_000)}
            else:
                tx = {"from": sender, "to": receiver, "value": hex(10**15 + n), "gas": hex(21_000)}
            batch.append({"jsonrpc": "2.0", "id": n, "method": "eth_sendTransaction",
                          "params": [tx]})  # fmt: skip
            n += 1
        replies = httpx.post(chain.url, json=batch, timeout=60).json()
        failed = [r for r in replies if "error" in r]
        if failed:
            raise RuntimeError(f"sending the transfers failed: {failed[0]}")
        chain.mine()
    last = chain.rpc.block_number()
    for number in (first, last):
        got = len(chain.rpc.block(number).transactions)
        if got != per_block:
            raise RuntimeError(f"block {number} holds {got} transactions, not {per_block}")
    return first, last


def ceiling(url: str, token: str, first: int, last: int) -> tuple[float, int]:
    """(seconds, transfers) of the bare read loop."""
    with EthRpc(url) as rpc:
        transfers = 0
        started = time.perf_counter()
        for number in range(first, last + 1):
            block = rpc.call("eth_getBlockByNumber", hex(number), True)
            logs = rpc.call("eth_getLogs", {"blockHash": block["hash"], "address": [token],
                                            "topics": [TRANSFER_TOPIC]})  # fmt: skip
            transfers += sum(1 for tx in block["transactions"] if int(tx["value"], 16)) + len(logs)
        return time.perf_counter() - started, transfers


def scan(url: str, chain_id: int, token: str, first: int, last: int) -> tuple[float, int]:
    """(seconds, deposits confirmed) of the scanner reading the same blocks."""
    with EthRpc(url) as rpc:
        scanner = Scanner(
            rpc,
            chain_id=chain_id,
            confirmations=1,
            addresses={a: f"acct-{i}" for i, a in enumerate(deposit_addresses())},
            assets=[ETH, Asset("TKN", decimals=6, asset_decimals=6, token=token)],
            start=first,
        )
        confirmed = 0
        started = time.perf_counter()
        while scanner.tip < last:
            result = scanner.poll(max_blocks=last - scanner.tip)
            confirmed += len(result.confirmed)
        return time.perf_counter() - started, confirmed


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.chain")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--per-block", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"bench.chain: {args.blocks} blocks x {args.per_block} deposits (half ETH, half "
          f"ERC-20), {args.runs} runs; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    with Anvil() as chain:
        token = chain.deploy_token(chain.accounts[0])
        for sender in chain.accounts[1:SENDERS]:  # every sender holds tokens to send
            chain.transfer_token(token, chain.accounts[0], sender, 10**12)
        chain.mine()
        started = time.perf_counter()
        first, last = make_blocks(chain, token, args.blocks, args.per_block)
        expected = args.blocks * args.per_block
        print(f"  set-up: blocks {first}..{last} mined in {time.perf_counter() - started:.1f} s")
        peer, ours = [], []
        for run in range(args.runs):
            seconds, transfers = ceiling(chain.url, token, first, last)
            if transfers != expected:
                raise RuntimeError(f"the bare loop read {transfers} transfers, not {expected}")
            peer.append(transfers / seconds)
            seconds, confirmed = scan(chain.url, chain.chain_id, token, first, last)
            if confirmed != expected:
                raise RuntimeError(f"the scanner confirmed {confirmed} deposits, not {expected}")
            ours.append(confirmed / seconds)
            print(f"  run {run + 1}: ceiling {peer[-1]:,.0f} transfers/s, "
                  f"scanner {ours[-1]:,.0f} deposits/s")  # fmt: skip
    ratio = statistics.median(ours) / statistics.median(peer)
    print(
        f"ceiling (eth_getBlockByNumber + eth_getLogs): {statistics.median(peer):,.0f} transfers/s"
    )
    print(
        f"scanner (Scanner.poll, every check):          {statistics.median(ours):,.0f} deposits/s"
    )
    print(f"ratio {ratio:.2f}   target >= {TARGET:.2f}: {'met' if ratio >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
