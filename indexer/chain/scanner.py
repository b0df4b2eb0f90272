"""The deposit scanner: follows one EVM chain block by block, finds the transfers to the
exchange's deposit addresses, and says which are confirmed (N blocks deep) and which a
reorganization orphaned. Logic over an `EthRpc` only: the watcher around it keeps the
checkpoint and the deposits in PostgreSQL, publishes them, and credits the confirmed ones
through the cluster (issue 13).

What it indexes: native transfers (a transaction whose `to` is a deposit address, with value,
that succeeded: its receipt's status is 1) and ERC-20 `Transfer` logs of the configured
token contracts to a deposit address. Not seen: native value moved by a contract's internal
call (no log records it; an exchange asks for direct transfers).

Reorgs. The scanner keeps the hashes of the recent blocks it indexed (`window`: at least the
confirmation depth plus `REORG_MARGIN`). Every poll it first asks again for its own tip: a
different hash there is a reorg even when the new chain has the same height (otherwise
invisible); a new block whose parent is not the hash it holds is one too. It then walks back
to the highest height where the node's block is the one it indexed (the fork point), drops
what it indexed above it, and reports the deposits of those blocks as orphaned; the next poll
indexes the new fork. A reorg as deep as the confirmation depth, or one that reaches past the
window, is a `DeepReorg`: confirmed deposits may have been credited from blocks that are
gone. The scanner stops there (raises) until an operator acts (docs/operating/chain.md).

Amounts: integers only. A token with `decimals` d on the chain and `asset_decimals` a in the
exchange credits `raw // 10**(d - a)` and keeps the rest as `dust` (never credited, recorded);
a < d is required for tokens with fewer decimals than the exchange's asset (then raw *
10**(a - d)).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from .rpc import BadChainData, Block, EthRpc, Transaction, address, quantity

REORG_MARGIN = 16  # blocks kept beyond the confirmation depth to find a fork point
SEEN, CONFIRMED, ORPHANED = "seen", "confirmed", "orphaned"


def credit_ref(chain_id: int, tx_hash: str, log_index: int | None) -> str:
    """The credit's idempotency key: `chain_id:tx:log`, the transaction hash in base64url
    (43 characters: the exchange's refs are at most 64), the log index, or `n` for a native
    transfer. Unique per deposit, the same on every watcher."""
    tx = base64.urlsafe_b64encode(bytes.fromhex(tx_hash[2:])).decode().rstrip("=")
    return f"{chain_id}:{tx}:{'n' if log_index is None else log_index}"


class DeepReorg(Exception):
    """A reorganization the scanner must not absorb silently. `result` is the poll up to it
    (what it orphaned); the scanner's window is already at the fork point."""

    def __init__(self, message: str, *, depth: int, result: PollResult) -> None:
        super().__init__(message)
        self.depth = depth
        self.result = result


@dataclass(frozen=True)
class Asset:
    """How a chain amount becomes an exchange amount: `token` None is the chain's native coin."""

    asset: str
    decimals: int  # on the chain (18 for ETH)
    asset_decimals: int  # in the exchange's integer units
    token: str | None = None

    def convert(self, raw: int) -> tuple[int, int]:
        """(exchange units, dust in chain units that is not credited)."""
        shift = self.decimals - self.asset_decimals
        if shift >= 0:
            amount, dust = divmod(raw, 10**shift)
            return amount, dust
        return raw * 10 ** (-shift), 0


@dataclass(frozen=True)
class Deposit:
    ref: str  # the idempotency key of its credit (`credit_ref`)
    chain_id: int
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int | None  # None: a native transfer
    address: str  # the deposit address it was sent to
    account: str
    asset: str
    amount: int  # exchange units
    dust: int  # chain units below the exchange's precision, not credited
    raw: int  # chain units
    status: str = SEEN


@dataclass
class PollResult:
    head: int
    indexed_to: int  # the highest block indexed after this poll
    seen: list[Deposit] = field(default_factory=list)
    confirmed: list[Deposit] = field(default_factory=list)
    orphaned: list[Deposit] = field(default_factory=list)
    reorg_depth: int = 0  # blocks dropped by a reorg this poll (0: none)
    node_behind: bool = (
        False  # the node has no block where one was indexed, or says its head is below
    )


class Scanner:
    def __init__(
        self,
        rpc: EthRpc,
        *,
        chain_id: int,
        confirmations: int,
        addresses: Mapping[str, str],  # deposit address -> account
        assets: Iterable[Asset],
        start: int,  # the first block to index when `window` is empty
        window: Mapping[int, str] | None = None,  # height -> hash of indexed blocks
        pending: Iterable[Deposit] = (),  # seen, not yet confirmed
    ) -> None:
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1")
        self.rpc = rpc
        self.chain_id = chain_id
        self.confirmations = confirmations
        self.addresses = {address(a, "deposit address"): acc for a, acc in addresses.items()}
        assets = list(assets)
        self.native = next((a for a in assets if a.token is None), None)
        self.tokens = {address(a.token, "token"): a for a in assets if a.token is not None}
        self.window: dict[int, str] = dict(window or {})
        self.start = start
        self.pending: dict[str, Deposit] = {d.ref: d for d in pending}
        self._block_receipts = True  # until the node says it has no eth_getBlockReceipts

    def set_addresses(self, addresses: Mapping[str, str]) -> None:
        """The deposit addresses from now on (the watcher reads them from the cluster before
        each poll). Blocks already indexed are not read again for a new address."""
        self.addresses = {address(a, "deposit address"): acc for a, acc in addresses.items()}

    @property
    def tip(self) -> int:
        """The highest block indexed (start - 1 before the first)."""
        return max(self.window) if self.window else self.start - 1

    def check_chain(self) -> None:
        found = self.rpc.chain_id()
        if found != self.chain_id:
            raise BadChainData(f"the node serves chain {found}, not {self.chain_id}")

    def poll(self, max_blocks: int = 200) -> PollResult:
        head = self.rpc.block_number()
        if not self.window and self.start > 0:
            # The parent of the first block to index anchors the window: a reorg that replaces
            # the first indexed block has its fork point there.
            anchor = self.rpc.block(self.start - 1)
            if anchor is None:
                raise BadChainData(f"the node has no block {self.start - 1} (head {head})")
            self.window[anchor.number] = anchor.hash
        result = PollResult(head=head, indexed_to=self.tip)
        if self.window:
            tip = self.tip
            ours = self.rpc.block(tip)
            if ours is None:
                # The node has no block where one was indexed: it is behind (a lagging node
                # behind a load balancer, a node that lies about its height). Nothing is
                # indexed, confirmed or orphaned on its word; a chain that really became
                # shorter shows another block at this height once it grows again.
                result.node_behind = True
                return result
            if ours.hash != self.window[tip]:
                self._reorg(tip, result)
        if head < self.tip:
            result.node_behind = True
        height = self.tip + 1
        while height <= min(head, self.tip + max_blocks):
            block = self.rpc.block(height)
            if block is None:
                break  # the node has no block there (yet): next poll
            parent = self.window.get(height - 1)
            if parent is not None and block.parent_hash != parent:
                self._reorg(height - 1, result)
                break  # index the new fork from the fork point on the next poll
            self._index(block, result)
            height += 1
        # Depth counts blocks this scanner has read and linked by parent hash up to its tip,
        # never the head the node claims: a node that says its head is higher than it is
        # would otherwise confirm deposits early.
        for ref, deposit in sorted(self.pending.items(), key=lambda kv: kv[1].block_number):
            deep = self.tip - deposit.block_number + 1 >= self.confirmations
            if not deep or deposit.block_number > self.tip:
                continue
            del self.pending[ref]
            if self.window.get(deposit.block_number) != deposit.block_hash:
                # Its block is not one this scanner indexed (a checkpoint reset by an operator,
                # a deposit of an older fork read back from the database): never confirmed
                # unverified. If its transaction is on the chain, indexing finds it again.
                result.orphaned.append(replace(deposit, status=ORPHANED))
                continue
            result.confirmed.append(replace(deposit, status=CONFIRMED))
        keep = self.confirmations + REORG_MARGIN
        for h in [h for h in self.window if h <= self.tip - keep]:
            del self.window[h]
        result.indexed_to = self.tip
        return result

    # -- inside a poll ---------------------------------------------------------------------

    def _index(self, block: Block, result: PollResult) -> None:
        found: list[Deposit] = []
        if self.native is not None:
            candidates = [t for t in block.transactions if t.to in self.addresses and t.value > 0]
            succeeded = self._succeeded(block, candidates) if candidates else set()
            for tx in candidates:
                if tx.hash in succeeded:
                    found.append(self._deposit(block, tx.hash, None, tx.to, self.native, tx.value))
        if self.tokens:
            for log in self.rpc.transfer_logs(block.hash, sorted(self.tokens)):
                if log.removed or log.receiver not in self.addresses or log.value == 0:
                    continue
                asset = self.tokens.get(log.token)
                if asset is None:
                    raise BadChainData(f"eth_getLogs sent a log of {log.token}, not asked for")
                found.append(
                    self._deposit(block, log.tx_hash, log.log_index, log.receiver, asset, log.value)
                )
        self.window[block.number] = block.hash
        for deposit in found:
            self.pending[deposit.ref] = deposit
            result.seen.append(deposit)

    def _succeeded(self, block: Block, candidates: list[Transaction]) -> set[str]:
        """The hashes of `candidates` whose receipt says they succeeded (a reverted transfer
        moved nothing): the block's receipts in one call, or one call each on a node
        without `eth_getBlockReceipts`."""
        statuses = self.rpc.receipt_statuses(block.hash) if self._block_receipts else None
        if statuses is None:
            self._block_receipts = False
            statuses = {}
            for tx in candidates:
                receipt = self.rpc.call("eth_getTransactionReceipt", tx.hash)
                if not isinstance(receipt, dict) or "status" not in receipt:
                    raise BadChainData(f"no receipt with a status for {tx.hash}")
                statuses[tx.hash] = quantity(receipt["status"], "receipt status")
        missing = [tx.hash for tx in candidates if tx.hash not in statuses]
        if missing:
            raise BadChainData(f"block {block.number}: no receipt for {missing[0]}")
        return {tx.hash for tx in candidates if statuses[tx.hash] == 1}

    def _deposit(
        self, block: Block, tx_hash: str, log_index: int | None, to: str, asset: Asset, raw: int
    ) -> Deposit:
        amount, dust = asset.convert(raw)
        return Deposit(
            ref=credit_ref(self.chain_id, tx_hash, log_index),
            chain_id=self.chain_id,
            block_number=block.number,
            block_hash=block.hash,
            tx_hash=tx_hash,
            log_index=log_index,
            address=to,
            account=self.addresses[to],
            asset=asset.asset,
            amount=amount,
            dust=dust,
            raw=raw,
        )

    def _reorg(self, mismatch: int, result: PollResult) -> None:
        """The block we indexed at `mismatch` is not the node's: find the fork point below
        it, drop what was indexed above it."""
        fork = mismatch - 1
        while fork in self.window:
            block = self.rpc.block(fork)
            if block is not None and block.hash == self.window[fork]:
                break
            fork -= 1
        else:
            if self.window and fork < min(self.window):
                raise DeepReorg(
                    f"chain {self.chain_id}: no block of the last {len(self.window)} indexed "
                    f"(from {min(self.window)} to {self.tip}) is on the node's chain",
                    depth=self.tip - fork,
                    result=result,
                )
        depth = self.tip - fork
        orphaned = [d for d in self.pending.values() if d.block_number > fork]
        for deposit in orphaned:
            del self.pending[deposit.ref]
            result.orphaned.append(replace(deposit, status=ORPHANED))
        for h in [h for h in self.window if h > fork]:
            del self.window[h]
        result.reorg_depth = max(result.reorg_depth, depth)
        if depth >= self.confirmations:
            raise DeepReorg(
                f"chain {self.chain_id}: a reorganization {depth} blocks deep (blocks "
                f"{fork + 1}..{fork + depth} replaced), at or past the confirmation depth "
                f"{self.confirmations}: deposits confirmed from those blocks may be gone",
                depth=depth,
                result=result,
            )
