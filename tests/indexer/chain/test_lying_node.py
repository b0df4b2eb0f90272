"""A chain node that lies, between the scanner and a real anvil: a JSON-RPC proxy on loopback
rewrites its answers. Whatever it says about heights and hashes, and however it fails, no
deposit is confirmed early, none is orphaned on a lagging node's word, and every deposit on
the real chain is confirmed exactly once, from the real chain's block, once it answers
honestly again."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from indexer.chain.anvil import Anvil
from indexer.chain.rpc import BadChainData, ChainUnavailable, EthRpc
from indexer.chain.scanner import Asset, DeepReorg, Scanner

ETH = Asset("ETH", decimals=18, asset_decimals=9)
DEPOSITOR = 9

Lie = Callable[[str, list, Any], Any]  # (method, params, honest result) -> what to answer


class Refuse(Exception):
    """Raised by a lie: answer HTTP 500, or bytes that are not JSON (`garbage`), or a JSON-RPC
    error object (`error`: code, message)."""

    def __init__(self, garbage: bool = False, error: tuple[int, str] | None = None) -> None:
        self.garbage = garbage
        self.error = error


class LyingNode:
    """A JSON-RPC proxy in front of `upstream`; `lie` rewrites each result (None: honest)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.lie: Lie | None = None
        self.calls = 0
        self.methods: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = httpx.post(proxy.upstream, json=request, timeout=10).json()
                status, body = 200, b""
                try:
                    proxy.calls += 1
                    proxy.methods.append(request["method"])
                    if proxy.lie is not None and "result" in reply:
                        reply["result"] = proxy.lie(request["method"], request["params"],
                                                    reply["result"])  # fmt: skip
                    body = json.dumps(reply).encode()
                except Refuse as refusal:
                    status, body = (200, b"{not json") if refusal.garbage else (500, b"")
                    if refusal.error is not None:
                        code, message = refusal.error
                        error = {"code": code, "message": message}
                        reply = {"jsonrpc": "2.0", "id": request["id"], "error": error}
                        body = json.dumps(reply).encode()
                        status = 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.rpc = EthRpc(self.url, timeout_s=5)

    def close(self) -> None:
        self.rpc.close()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def liar(anvil: Anvil) -> Iterator[LyingNode]:
    node = LyingNode(anvil.url)
    yield node
    node.close()


def scanner(chain: Anvil, liar: LyingNode, confirmations: int = 3) -> Scanner:
    return Scanner(
        liar.rpc,
        chain_id=chain.chain_id,
        confirmations=confirmations,
        addresses={chain.accounts[1]: "alice", chain.accounts[2]: "bob"},
        assets=[ETH],
        start=chain.rpc.block_number() + 1,
    )


def deposit(chain: Anvil, to: int = 1) -> str:
    return chain.send(chain.accounts[DEPOSITOR], chain.accounts[to], value=10**18)


def test_a_node_claiming_a_higher_head_confirms_nothing_early(chain: Anvil, liar: LyingNode):
    liar.lie = lambda method, _p, result: (
        hex(int(result, 16) + 100) if method == "eth_blockNumber" else result
    )
    s = scanner(chain, liar, confirmations=3)
    tx = deposit(chain)
    chain.mine()
    first = s.poll()
    assert first.head == chain.rpc.block_number() + 100  # what it claims ...
    assert [d.tx_hash for d in first.seen] == [tx]
    assert first.confirmed == []  # ... confirms nothing: the deposit is 1 block deep
    chain.mine()
    assert s.poll().confirmed == []
    chain.mine()
    assert [d.tx_hash for d in s.poll().confirmed] == [tx]  # 3 real blocks deep


def test_a_lagging_node_orphans_nothing(chain: Anvil, liar: LyingNode):
    """A node behind the one the scanner read before (a load balancer's other backend): it
    has no block at the scanner's tip. Nothing is orphaned, confirmed or indexed on its word;
    once it has caught up the deposit is confirmed, once."""
    chain.mine(3)
    s = scanner(chain, liar, confirmations=3)
    tx = deposit(chain)
    chain.mine()
    assert [d.tx_hash for d in s.poll().seen] == [tx]
    behind = chain.rpc.block_number() - 2
    chain.mine(4)

    def lagging(method: str, params: list, result: Any) -> Any:
        if method == "eth_blockNumber":
            return hex(behind)
        if method == "eth_getBlockByNumber" and int(params[0], 16) > behind:
            return None
        return result

    liar.lie = lagging
    for _ in range(3):
        lag = s.poll()
        assert lag.node_behind
        assert (lag.seen, lag.confirmed, lag.orphaned, lag.reorg_depth) == ([], [], [], 0)
    liar.lie = None
    caught_up = s.poll()
    assert not caught_up.node_behind and caught_up.orphaned == []
    assert [d.tx_hash for d in caught_up.confirmed] == [tx]


def random_liar(rng: random.Random, rate: float) -> Lie:
    """Lies about heights and hashes and fails, at random: a head above or below the truth,
    no block where there is one, a block with another number or another hash (a fork that
    is not there), HTTP 500, an answer that is not JSON."""

    def lie(method: str, params: list, result: Any) -> Any:
        if rng.random() >= rate:
            return result
        kind = rng.choice(["head", "null", "number", "hash", "http", "garbage"])
        if kind == "http":
            raise Refuse()
        if kind == "garbage":
            raise Refuse(garbage=True)
        if method == "eth_blockNumber" and kind == "head":
            return hex(max(0, int(result, 16) + rng.choice([-3, -1, 1, 5, 50])))
        if method == "eth_getBlockByNumber" and isinstance(result, dict):
            if kind == "null":
                return None
            if kind == "number":
                return {**result, "number": hex(int(result["number"], 16) + 1)}
            if kind == "hash":
                return {**result, "hash": "0x" + rng.randbytes(32).hex()}
        return result

    return lie


def test_a_node_that_lies_and_fails_at_random_never_credits_wrongly(chain: Anvil, liar: LyingNode):
    rng = random.Random(20261202)
    confirmations = 6
    s = scanner(chain, liar, confirmations=confirmations)
    liar.lie = random_liar(rng, rate=0.15)
    sent: set[str] = set()
    confirmed: list = []
    seen_refs: set[str] = set()
    errors = 0

    def poll() -> None:
        nonlocal errors
        try:
            result = s.poll()
        except (BadChainData, ChainUnavailable):
            errors += 1  # the watcher retries with backoff: here, the next poll
            return
        confirmed.extend(result.confirmed)
        seen_refs.update(d.ref for d in result.seen)

    for step in range(60):
        if step % 3 == 0:
            sent.add(deposit(chain, to=1 + step % 2))
        chain.mine()
        poll()
    liar.lie = None  # honest again: everything on the chain is found and confirmed
    chain.mine(confirmations)
    for _ in range(5):
        poll()

    assert errors > 0 and liar.calls > 0  # the lies were told and refused
    assert sorted(d.tx_hash for d in confirmed) == sorted(sent)  # each one, exactly once
    for d in confirmed:
        real = chain.rpc.block(d.block_number)
        assert real is not None and d.block_hash == real.hash  # from the real chain's block
        assert chain.rpc.block_number() - d.block_number + 1 >= confirmations


def test_a_node_inventing_a_deep_fork_stops_the_scanner_loudly(chain: Anvil, liar: LyingNode):
    """A node that says every block the scanner indexed has another hash now (a fork as deep
    as the confirmation depth) is a deep reorganization as far as anyone can tell: an alarm,
    never a silent re-crediting."""
    s = scanner(chain, liar, confirmations=3)
    deposit(chain)
    chain.mine(4)
    assert len(s.poll().confirmed) == 1
    liar.lie = lambda method, _p, result: (
        {**result, "hash": "0x" + "ab" * 32}
        if method == "eth_getBlockByNumber" and isinstance(result, dict)
        else result
    )
    with pytest.raises(DeepReorg):
        s.poll()


def test_a_node_without_block_receipts_is_asked_per_transaction(chain: Anvil, liar: LyingNode):
    """Whether a native transfer succeeded comes from the block's receipts in one call
    (`eth_getBlockReceipts`); a node without that method is asked per transaction, with the
    same outcome: a transfer that reverted is no deposit."""

    def no_block_receipts(method: str, _params: list, result: Any) -> Any:
        if method == "eth_getBlockReceipts":
            raise Refuse(error=(-32601, "the method eth_getBlockReceipts does not exist"))
        return result

    token = chain.deploy_token()
    for lie in (None, no_block_receipts):
        liar.lie, liar.methods[:] = lie, []
        s = Scanner(liar.rpc, chain_id=chain.chain_id, confirmations=1,
                    addresses={token: "contract", chain.accounts[1]: "alice"}, assets=[ETH],
                    start=chain.rpc.block_number() + 1)  # fmt: skip
        # The token has no payable default function: value sent to it reverts, in a block.
        reverted = chain.send(chain.accounts[DEPOSITOR], token, value=10**18, gas=100_000)
        ok = deposit(chain)
        chain.mine()
        assert chain.receipt(reverted)["status"] == "0x0"
        assert [d.tx_hash for d in s.poll().seen] == [ok]
        per_tx = liar.methods.count("eth_getTransactionReceipt")
        assert per_tx == (0 if lie is None else 2)


def test_receipts_of_another_block_are_refused(chain: Anvil, liar: LyingNode):
    liar.lie = lambda method, _p, result: (
        [{**r, "blockHash": "0x" + "cd" * 32} for r in result]
        if method == "eth_getBlockReceipts"
        else result
    )
    s = scanner(chain, liar, confirmations=1)
    deposit(chain)
    chain.mine()
    with pytest.raises(BadChainData, match="sent a receipt of"):
        s.poll()
    liar.lie = None
    assert len(s.poll().confirmed) == 1
