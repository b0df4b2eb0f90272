"""What the chain node sends is parsed strictly: a malformed or missing field is a
`BadChainData` naming it, never a default, never a wrong amount; a node that does not answer
is `ChainUnavailable`."""

from __future__ import annotations

import socket

import pytest

from indexer.chain.rpc import (
    TRANSFER_TOPIC,
    BadChainData,
    ChainUnavailable,
    EthRpc,
    parse_block,
    parse_transfer_log,
    quantity,
)

HASH = "0x" + "ab" * 32
ADDR = "0x" + "11" * 20
TOPIC_ADDR = "0x" + "00" * 12 + "22" * 20


def good_log(**changes):
    log = {
        "address": ADDR,
        "topics": [TRANSFER_TOPIC, TOPIC_ADDR, TOPIC_ADDR],
        "data": "0x" + f"{12345:064x}",
        "blockNumber": "0x10",
        "blockHash": HASH,
        "transactionHash": HASH,
        "logIndex": "0x0",
    }
    log.update(changes)
    return log


def good_block(**changes):
    block = {"number": "0x10", "hash": HASH, "parentHash": HASH, "timestamp": "0x5",
             "transactions": []}  # fmt: skip
    block.update(changes)
    return block


@pytest.mark.parametrize("text", ["10", "0x", "0x01", "0xZZ", 16, None, "-0x1", "0x1 "])
def test_a_quantity_is_hex_without_leading_zeros(text) -> None:
    with pytest.raises(BadChainData, match="not a hex quantity"):
        quantity(text, "value")


def test_a_transfer_log_parses_and_every_bad_field_is_named() -> None:
    log = parse_transfer_log(good_log())
    assert (log.value, log.receiver, log.block_number) == (12345, "0x" + "22" * 20, 16)
    for changes, message in [
        ({"data": "0x" + "00" * 31}, "31 bytes"),
        ({"data": "0x12345"}, "not hex data"),
        ({"topics": [TRANSFER_TOPIC, TOPIC_ADDR]}, "2 topics"),
        ({"topics": ["0x" + "00" * 32, TOPIC_ADDR, TOPIC_ADDR]}, "not a Transfer log"),
        ({"topics": [TRANSFER_TOPIC, "0x" + "ff" * 32, TOPIC_ADDR]}, "not an address"),
        ({"blockHash": "0x12"}, "not a 32-byte hash"),
        ({"address": "0x1234"}, "not a 20-byte address"),
    ]:
        with pytest.raises(BadChainData, match=message):
            parse_transfer_log(good_log(**changes))
    missing = good_log()
    del missing["logIndex"]
    with pytest.raises(BadChainData, match="without 'logIndex'"):
        parse_transfer_log(missing)


def test_a_block_parses_and_its_transactions_must_be_objects() -> None:
    assert parse_block(good_block()).number == 16
    with pytest.raises(BadChainData, match="not an object"):
        parse_block(good_block(transactions=[HASH]))  # hashes: the node ignored "full"
    with pytest.raises(BadChainData, match="without 'parentHash'"):
        block = good_block()
        del block["parentHash"]
        parse_block(block)


def test_a_node_that_does_not_answer_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with EthRpc(f"http://127.0.0.1:{port}", timeout_s=1) as rpc, pytest.raises(ChainUnavailable):
        rpc.block_number()
