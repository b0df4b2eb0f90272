"""A local anvil node (npm `@foundry-rs/anvil`, pinned in package.json; `make test` runs `npm
ci`) for the chain watcher's tests and benchmark: started on a free loopback port with
`--no-mining` (blocks are mined on demand, `evm_mine`), stopped by pid. Plus the few
transactions the tests send: native transfers, the test token's deployment and transfers
(Token.json, compiled offline from Token.vy), from anvil's unlocked development accounts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..services import free_port
from .rpc import EthRpc, address, quantity

ROOT = Path(__file__).resolve().parents[2]
TOKEN_JSON = Path(__file__).resolve().parent / "contracts" / "Token.json"
TRANSFER_SELECTOR = "a9059cbb"  # transfer(address,uint256)


class AnvilUnavailable(RuntimeError):
    pass


def anvil_binary() -> str:
    """The platform binary npm installed (the package's `bin.mjs` only finds and runs it)."""
    for candidate in sorted((ROOT / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("anvil")
    if found:
        return found
    raise AnvilUnavailable(
        "anvil is not installed: run `npm ci` in the checkout (make test does), or put "
        "foundry's anvil on PATH"
    )


class Anvil:
    def __init__(self, *, chain_id: int = 31337, block_time_s: float | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.chain_id = chain_id
        argv = [anvil_binary(), "--host", "127.0.0.1", "--port", str(self.port),
                "--chain-id", str(chain_id), "--silent"]  # fmt: skip
        argv += ["--block-time", str(block_time_s)] if block_time_s else ["--no-mining"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.rpc = EthRpc(self.url, timeout_s=5)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.rpc.block_number()
                break
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    self.stop()
                    raise AnvilUnavailable(f"anvil did not start: {err.strip()[:500]}") from None
                time.sleep(0.05)
        self.accounts = [address(a, "account") for a in self.rpc.call("eth_accounts")]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.rpc.close()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- blocks and transactions ------------------------------------------------------------

    def mine(self, blocks: int = 1) -> int:
        for _ in range(blocks):
            self.rpc.call("evm_mine")
        return self.rpc.block_number()

    def send(self, sender: str, to: str | None, value: int = 0, data: str = "0x",
             gas: int | None = None) -> str:  # fmt: skip
        tx: dict = {"from": sender, "value": hex(value), "data": data}
        if to is not None:
            tx["to"] = to
        if gas is not None:
            tx["gas"] = hex(gas)
        return self.rpc.call("eth_sendTransaction", tx)

    def receipt(self, tx_hash: str) -> dict:
        receipt = self.rpc.call("eth_getTransactionReceipt", tx_hash)
        if receipt is None:
            raise RuntimeError(f"{tx_hash} is not mined")
        return receipt

    def deploy_token(self, sender: str | None = None) -> str:
        """Deploys the test token (6 decimals, the supply to `sender`); mines one block."""
        doc = json.loads(TOKEN_JSON.read_text())
        tx = self.send(sender or self.accounts[0], None, data=doc["bytecode"])
        self.mine()
        receipt = self.receipt(tx)
        if quantity(receipt["status"], "status") != 1:
            raise RuntimeError("the token's deployment failed")
        return address(receipt["contractAddress"], "contractAddress")

    def transfer_token(self, token: str, sender: str, to: str, value: int) -> str:
        data = "0x" + TRANSFER_SELECTOR + to[2:].rjust(64, "0") + f"{value:064x}"
        return self.send(sender, token, data=data)

    def snapshot(self) -> str:
        return self.rpc.call("evm_snapshot")

    def revert(self, snapshot_id: str) -> None:
        if self.rpc.call("evm_revert", snapshot_id) is not True:
            raise RuntimeError(f"evm_revert {snapshot_id} failed")
