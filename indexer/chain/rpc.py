"""Ethereum JSON-RPC over HTTP, the few methods the deposit watcher needs, with every answer
checked before it is believed (issue 13: bad data from the node is a clear error, never a
wrong credit).

Why not web3.py: the watcher reads four methods (`eth_chainId`, `eth_blockNumber`,
`eth_getBlockByNumber`, `eth_getLogs`) and decodes one event whose layout is fixed by the
ERC-20 standard; web3.py would bring an asyncio stack and a large dependency tree for that,
and it trusts the node's field types. Here every quantity, hash and address is parsed strictly
(docs/adr/0010-chain-deposits.md). The tests talk to a real node (anvil), never a mock.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import httpx

# keccak256("Transfer(address,address,uint256)"): topic 0 of every ERC-20 Transfer log.
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"

_QUANTITY = re.compile(r"0x(0|[1-9a-f][0-9a-f]*)")
_HASH = re.compile(r"0x[0-9a-f]{64}")
_ADDRESS = re.compile(r"0x[0-9a-f]{40}")
_DATA = re.compile(r"0x([0-9a-f]{2})*")


class ChainError(Exception):
    """The chain node could not be used for this call; the watcher retries with backoff."""


class ChainUnavailable(ChainError):
    """No answer: connection refused, timeout, an HTTP error status."""


class RpcError(ChainError):
    """The node answered with a JSON-RPC error object."""

    def __init__(self, method: str, code: Any, message: Any) -> None:
        super().__init__(f"{method}: error {code}: {message}")
        self.code = code


class BadChainData(ChainError):
    """The node answered, but not with what the method promises (a missing or malformed
    field, a block that is not the one asked for): nothing of it is believed."""


def quantity(value: Any, what: str) -> int:
    if not isinstance(value, str) or not _QUANTITY.fullmatch(value.lower()):
        raise BadChainData(f"{what}: not a hex quantity: {value!r}")
    return int(value, 16)


def block_hash(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HASH.fullmatch(value.lower()):
        raise BadChainData(f"{what}: not a 32-byte hash: {value!r}")
    return value.lower()


def address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value.lower()):
        raise BadChainData(f"{what}: not a 20-byte address: {value!r}")
    return value.lower()


def data(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _DATA.fullmatch(value.lower()):
        raise BadChainData(f"{what}: not hex data: {value!r}")
    return bytes.fromhex(value[2:])


@dataclass(frozen=True)
class Transaction:
    hash: str
    sender: str
    to: str | None  # None: a contract creation
    value: int  # wei
    index: int  # position in its block


@dataclass(frozen=True)
class Block:
    number: int
    hash: str
    parent_hash: str
    timestamp: int
    transactions: tuple[Transaction, ...]


@dataclass(frozen=True)
class TransferLog:
    """An ERC-20 Transfer log."""

    token: str  # the contract that logged it
    sender: str
    receiver: str
    value: int
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    removed: bool


class EthRpc:
    """A synchronous JSON-RPC client (the watcher runs it in a thread of its own)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.url = url
        self._http = httpx.Client(timeout=timeout_s)
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EthRpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, *params: Any) -> Any:
        request_id = next(self._ids)
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": list(params)}
        try:
            response = self._http.post(self.url, json=body)
            response.raise_for_status()
            reply = response.json()
        except httpx.HTTPError as exc:
            raise ChainUnavailable(f"{method}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:
            raise BadChainData(f"{method}: the answer is not JSON: {exc}") from exc
        if not isinstance(reply, dict) or reply.get("id") != request_id:
            raise BadChainData(f"{method}: not the answer to request {request_id}: {reply!r:.200}")
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise RpcError(method, error.get("code"), error.get("message"))
        if "result" not in reply:
            raise BadChainData(f"{method}: an answer without a result")
        return reply["result"]

    # -- the methods the watcher reads -------------------------------------------------------

    def chain_id(self) -> int:
        return quantity(self.call("eth_chainId"), "eth_chainId")

    def block_number(self) -> int:
        return quantity(self.call("eth_blockNumber"), "eth_blockNumber")

    def block(self, number: int) -> Block | None:
        """The block at `number` with its transactions, or None if the node has none there."""
        raw = self.call("eth_getBlockByNumber", hex(number), True)
        if raw is None:
            return None
        block = parse_block(raw)
        if block.number != number:
            raise BadChainData(f"asked for block {number}, the node sent block {block.number}")
        return block

    def receipt_statuses(self, block: str) -> dict[str, int] | None:
        """{transaction hash: receipt status} of every transaction in the block with hash
        `block`, in one `eth_getBlockReceipts`; None if the node does not have that method
        (the caller asks per transaction)."""
        try:
            raw = self.call("eth_getBlockReceipts", block)
        except RpcError as exc:
            if exc.code in (-32601, -32602):  # method not found / params not understood
                return None
            raise
        if raw is None:  # it just served the block: reorganized meanwhile, or lying
            raise BadChainData(f"eth_getBlockReceipts: no receipts for block {block}")
        if not isinstance(raw, list):
            raise BadChainData(f"eth_getBlockReceipts: not a list: {raw!r:.200}")
        statuses = {}
        for receipt in raw:
            if not isinstance(receipt, dict):
                raise BadChainData("eth_getBlockReceipts: a receipt that is not an object")
            try:
                if block_hash(receipt["blockHash"], "receipt blockHash") != block:
                    raise BadChainData(
                        f"eth_getBlockReceipts for block {block} sent a receipt of "
                        f"{receipt['blockHash']}"
                    )
                tx = block_hash(receipt["transactionHash"], "receipt transactionHash")
                statuses[tx] = quantity(receipt["status"], "receipt status")
            except KeyError as exc:
                raise BadChainData(f"a receipt without {exc.args[0]!r}") from exc
        return statuses

    def transfer_logs(self, block: str, tokens: list[str]) -> list[TransferLog]:
        """The Transfer logs of `tokens` in the block with hash `block` (by hash: a reorg
        between the block and its logs cannot mix two forks)."""
        if not tokens:
            return []
        raw = self.call(
            "eth_getLogs", {"blockHash": block, "address": tokens, "topics": [TRANSFER_TOPIC]}
        )
        if not isinstance(raw, list):
            raise BadChainData(f"eth_getLogs: not a list: {raw!r:.200}")
        logs = [parse_transfer_log(item) for item in raw]
        for log in logs:
            if log.block_hash != block:
                raise BadChainData(f"eth_getLogs for block {block} sent a log of {log.block_hash}")
        return logs


def parse_block(raw: Any) -> Block:
    if not isinstance(raw, dict):
        raise BadChainData(f"a block that is not an object: {raw!r:.200}")
    try:
        number = quantity(raw["number"], "block number")
        txs = raw["transactions"]
        if not isinstance(txs, list):
            raise BadChainData(f"block {number}: transactions is not a list")
        transactions = tuple(parse_transaction(tx, number) for tx in txs)
        return Block(
            number=number,
            hash=block_hash(raw["hash"], f"block {number} hash"),
            parent_hash=block_hash(raw["parentHash"], f"block {number} parentHash"),
            timestamp=quantity(raw["timestamp"], f"block {number} timestamp"),
            transactions=transactions,
        )
    except KeyError as exc:
        raise BadChainData(f"a block without {exc.args[0]!r}") from exc


def parse_transaction(raw: Any, block_number: int) -> Transaction:
    if not isinstance(raw, dict):
        # eth_getBlockByNumber(..., true) sends objects; hashes mean the node ignored `true`.
        raise BadChainData(f"block {block_number}: a transaction that is not an object")
    try:
        to = raw["to"]
        return Transaction(
            hash=block_hash(raw["hash"], "transaction hash"),
            sender=address(raw["from"], "transaction from"),
            to=None if to is None else address(to, "transaction to"),
            value=quantity(raw["value"], "transaction value"),
            index=quantity(raw["transactionIndex"], "transactionIndex"),
        )
    except KeyError as exc:
        raise BadChainData(f"block {block_number}: a transaction without {exc.args[0]!r}") from exc


def parse_transfer_log(raw: Any) -> TransferLog:
    if not isinstance(raw, dict):
        raise BadChainData(f"a log that is not an object: {raw!r:.200}")
    try:
        topics = raw["topics"]
        if not isinstance(topics, list) or len(topics) != 3:
            raise BadChainData(f"a Transfer log with {len(topics)} topics (3 expected)")
        if str(topics[0]).lower() != TRANSFER_TOPIC:
            raise BadChainData(f"not a Transfer log: topic 0 {topics[0]!r}")
        value = data(raw["data"], "Transfer data")
        if len(value) != 32:
            raise BadChainData(f"Transfer data of {len(value)} bytes (32 expected)")
        return TransferLog(
            token=address(raw["address"], "log address"),
            sender=_topic_address(topics[1]),
            receiver=_topic_address(topics[2]),
            value=int.from_bytes(value, "big"),
            block_number=quantity(raw["blockNumber"], "log blockNumber"),
            block_hash=block_hash(raw["blockHash"], "log blockHash"),
            tx_hash=block_hash(raw["transactionHash"], "log transactionHash"),
            log_index=quantity(raw["logIndex"], "logIndex"),
            removed=bool(raw.get("removed", False)),
        )
    except KeyError as exc:
        raise BadChainData(f"a log without {exc.args[0]!r}") from exc


def _topic_address(topic: Any) -> str:
    word = block_hash(topic, "Transfer topic")
    if word[2:26] != "0" * 24:
        raise BadChainData(f"a Transfer topic that is not an address: {topic!r}")
    return "0x" + word[26:]
