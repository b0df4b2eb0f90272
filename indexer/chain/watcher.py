"""The chain watcher's step: read the deposit addresses from the cluster, poll the chain,
record what was found in PostgreSQL, credit what is confirmed through the cluster.

    watcher = Watcher(rpc, store, admin, node_url, chain)   # resumes from the store
    await watcher.step(lease)                               # one poll and its credits
    await watcher.run(holder, stop)                         # under the chain's lease, until stop

A credit is an admin `deposit` command whose `ref` is the deposit's (`chain:tx:log`). The
exchange refuses a repeated ref (`duplicate_ref`), so a credit resent after a lost answer, a
restart between the credit and its record, or a second watcher crediting the same deposit
applies once; the refusal is taken as the credit. An answer that stays unknown leaves the
deposit `confirmed`: the next step resends the same ref, which settles it. A deposit below
the asset's exchange precision (amount 0) is recorded as `dust` and never sent.

One watcher per chain: `run` steps only while it holds the chain's lease in PostgreSQL
(every write is fenced by it, `store.Fenced`); another takes over from the checkpoint once the
holder's lease expires. A chain node that does not answer, or answers nonsense
(`rpc.ChainError`), is retried with backoff; a `DeepReorg` stops the watcher (an operator's
case). With a `DepositTopic`, every status a deposit reaches is published to Kafka before it
is recorded (at least once). Not here yet (issue 13 continues): the sidecar process around
`run`, metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from api.sdk import AdminClient, ApiError, ClusterUnavailable

from ..kafka import KafkaUnavailable
from .publish import DepositTopic
from .rpc import ChainError, EthRpc
from .scanner import Asset, DeepReorg, Deposit, PollResult, Scanner
from .store import CREDITED, DUST, ChainLease, ChainStore, Fenced

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chain:
    chain_id: int
    confirmations: int
    assets: tuple[Asset, ...]
    start_block: int  # the first block a new watcher indexes (a chain's deployment height)


@dataclass
class StepResult:
    poll: PollResult
    credited: list[Deposit]
    unsettled: list[Deposit]  # confirmed, credit outcome not known yet: resent next step


class Watcher:
    def __init__(
        self,
        rpc: EthRpc,
        store: ChainStore,
        admin: AdminClient,
        node_url: str,
        chain: Chain,
        topic: DepositTopic | None = None,
    ) -> None:
        self.topic = topic  # None: no Kafka (PostgreSQL only)
        # What the node status shows (the `chain` object; docs/reference/chain.md).
        self.status: dict = {"configured": True, "active": False, "state": "starting",
                             "chain_id": chain.chain_id, "credited": 0, "orphaned": 0,
                             "reorgs": 0}  # fmt: skip
        self.rpc = rpc
        self.store = store
        self.admin = admin
        self.node_url = node_url
        self.chain = chain
        self.scanner: Scanner | None = None

    async def _scanner(self) -> Scanner:
        if self.scanner is None:
            resume = await self.store.resume(self.chain.chain_id)
            self.scanner = Scanner(
                self.rpc,
                chain_id=self.chain.chain_id,
                confirmations=self.chain.confirmations,
                addresses={},
                assets=self.chain.assets,
                start=self.chain.start_block,
                window=resume.blocks,
                pending=resume.pending,
            )
            await asyncio.to_thread(self.scanner.check_chain)
        return self.scanner

    async def step(self, lease: ChainLease) -> StepResult:
        scanner = await self._scanner()
        rows = await asyncio.to_thread(
            self.admin.deposit_addresses, self.node_url, self.chain.chain_id
        )
        scanner.set_addresses({row["address"]: row["account"] for row in rows})
        poll = await asyncio.to_thread(scanner.poll)
        await self._publish([*poll.orphaned, *poll.seen, *poll.confirmed])
        await self.store.record(lease, poll, scanner.window)
        deposits = await self.store.to_credit(self.chain.chain_id)
        credited, unsettled = await self._credit(lease, deposits)
        st = self.status
        st.update(head=poll.head, indexed_to=poll.indexed_to, waiting=len(scanner.pending),
                  to_credit=len(unsettled), node_behind=poll.node_behind,
                  last_error=None)  # fmt: skip
        st["credited"] += len(credited)
        st["orphaned"] += len(poll.orphaned)
        st["reorgs"] += 1 if poll.reorg_depth else 0
        return StepResult(poll, credited, unsettled)

    async def _publish(self, deposits: list[Deposit], status: str | None = None) -> None:
        if self.topic is not None and deposits:
            await self.topic.publish(deposits, status)

    async def run(
        self,
        holder: str,
        stop: asyncio.Event,
        *,
        poll_s: float = 1.0,
        lease_ttl_s: float = 3.0,
        backoff_max_s: float = 10.0,
    ) -> None:
        """Step every `poll_s` while holding the chain's lease, until `stop` is set."""
        lease: ChainLease | None = None
        backoff = poll_s
        try:
            while not stop.is_set():
                if lease is None:
                    self.status.update(active=False, state="standby")
                    lease = await self.store.try_acquire(self.chain.chain_id, holder, lease_ttl_s)
                    if lease is None:
                        await _wait(stop, lease_ttl_s / 3)
                        continue
                    self.status.update(active=True, state="active", epoch=lease.epoch)
                    self.scanner = None  # resume from what the previous holder wrote
                    log.info("chain %s: %s holds the lease (epoch %d)",
                             self.chain.chain_id, holder, lease.epoch)  # fmt: skip
                try:
                    await self.step(lease)
                    self.status.update(active=True, state="active")
                    backoff = poll_s
                except Fenced:
                    log.warning("chain %s: %s lost the lease", self.chain.chain_id, holder)
                    lease = None
                    continue
                except DeepReorg as exc:
                    self.status.update(active=False, state="alarm", alarm=str(exc))
                    raise
                except (ChainError, ApiError, ClusterUnavailable, KafkaUnavailable) as exc:
                    # The chain node, the cluster or Kafka: retried with backoff, from what
                    # was recorded (a poll cut short may have moved the scanner past it).
                    self.scanner = None
                    self.status.update(state="retrying", last_error=f"{type(exc).__name__}: {exc}")
                    log.warning("chain %s: %s; retrying in %.1f s",
                                self.chain.chain_id, exc, backoff)  # fmt: skip
                    await _wait(stop, backoff)
                    backoff = min(backoff * 2, backoff_max_s)
                    if not await self.store.renew(lease, lease_ttl_s):
                        lease = None
                    continue
                if not await self.store.renew(lease, lease_ttl_s):
                    lease = None
                    continue
                await _wait(stop, poll_s)
        finally:
            if lease is not None:
                await self.store.release(lease)

    async def _credit(
        self, lease: ChainLease, deposits: Iterable[Deposit]
    ) -> tuple[list[Deposit], list[Deposit]]:
        credited, unsettled = [], []
        for deposit in deposits:
            if deposit.amount == 0:
                await self._publish([deposit], DUST)
                await self.store.dust_only(lease, deposit.ref)
                continue
            command = {"op": "deposit", "account": deposit.account, "asset": deposit.asset,
                       "amount": deposit.amount, "ref": deposit.ref}  # fmt: skip
            try:
                [answer] = await asyncio.to_thread(self.admin.submit, [command])
            except Exception:  # unknown, no leader, the cluster away: resent next step
                unsettled.append(deposit)
                continue
            events = answer.get("events") or []
            if not events:  # {"error": not_leader | outcome_unknown}
                unsettled.append(deposit)
                continue
            first = events[0]
            if first.get("type") == "rejected" and first.get("reason") != "duplicate_ref":
                # The exchange refused the credit itself (an unknown asset, an amount over
                # its limits): a configuration error, left confirmed and reported.
                unsettled.append(deposit)
                continue
            seq = first.get("seq") if first.get("type") != "rejected" else None
            await self._publish([deposit], CREDITED)
            await self.store.credited(lease, deposit.ref, seq)
            credited.append(deposit)
        return credited, unsettled


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
