"""The chain watcher's step: read the deposit addresses from the cluster, poll the chain,
record what was found in PostgreSQL, credit what is confirmed through the cluster.

    watcher = Watcher(rpc, store, admin, node_url, chain)   # resumes from the store
    await watcher.step()                                    # one poll and its credits

A credit is an admin `deposit` command whose `ref` is the deposit's (`chain:tx:log`). The
exchange refuses a repeated ref (`duplicate_ref`), so a credit resent after a lost answer, a
restart between the credit and its record, or a second watcher crediting the same deposit
applies once; the refusal is taken as the credit. An answer that stays unknown leaves the
deposit `confirmed`: the next step resends the same ref, which settles it. A deposit below
the asset's exchange precision (amount 0) is recorded as `dust` and never sent.

Not here yet (issue 13 continues): the process around it (a sidecar with a lease, so that
one watcher runs per chain), the Kafka topic, metrics, backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from api.sdk import AdminClient

from .rpc import EthRpc
from .scanner import Asset, Deposit, PollResult, Scanner
from .store import ChainStore


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
        self, rpc: EthRpc, store: ChainStore, admin: AdminClient, node_url: str, chain: Chain
    ) -> None:
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

    async def step(self) -> StepResult:
        scanner = await self._scanner()
        rows = await asyncio.to_thread(
            self.admin.deposit_addresses, self.node_url, self.chain.chain_id
        )
        scanner.set_addresses({row["address"]: row["account"] for row in rows})
        poll = await asyncio.to_thread(scanner.poll)
        await self.store.record(self.chain.chain_id, poll, scanner.window)
        credited, unsettled = await self._credit(await self.store.to_credit(self.chain.chain_id))
        return StepResult(poll, credited, unsettled)

    async def _credit(self, deposits: Iterable[Deposit]) -> tuple[list[Deposit], list[Deposit]]:
        credited, unsettled = [], []
        for deposit in deposits:
            if deposit.amount == 0:
                await self.store.dust_only(deposit.ref)
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
            await self.store.credited(deposit.ref, seq)
            credited.append(deposit)
        return credited, unsettled
