"""HTTPS on the API port: Hypercorn serves the app with a certificate, and clients verify it."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from api.app import create_app
from api.auth import Verifier, new_credentials
from api.sdk import AdminClient
from tests.certs import self_signed


class StandInNode:
    node_id = "n1"

    async def status(self) -> dict:
        return {"node_id": "n1", "role": "leader"}


async def serving(app, cert: Path, key: Path, nursery: trio.Nursery) -> tuple[str, trio.Event]:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.certfile, config.keyfile = str(cert), str(key)
    config.accesslog = config.errorlog = None
    stop = trio.Event()
    binds = await nursery.start(
        lambda task_status: serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
    )
    return binds[0], stop


def root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def test_https_with_a_verified_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    app = create_app(StandInNode(), Verifier([]))  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url, stop = await serving(app, cert, key, nursery)
            try:
                assert url.startswith("https://127.0.0.1:")
                trusted = ssl.create_default_context(cafile=str(cert))
                async with httpx.AsyncClient(verify=trusted) as client:
                    response = await client.get(url + "/healthz")
                assert response.status_code == 200
                assert response.json() == {"ok": True, "node_id": "n1"}
                # Not trusting the certificate fails the handshake: the channel really is TLS.
                async with httpx.AsyncClient() as client:
                    with pytest.raises(httpx.ConnectError) as refused:
                        await client.get(url + "/healthz")
                assert isinstance(root_cause(refused.value), ssl.SSLCertVerificationError)
                # Plain HTTP on the port is not answered as HTTP.
                async with httpx.AsyncClient() as client:
                    with pytest.raises(httpx.HTTPError):
                        await client.get(url.replace("https://", "http://") + "/healthz")

                # The SDK takes the CA file (or an ssl context) as `verify=`.
                def sdk_status() -> dict:
                    with AdminClient([url], new_credentials("admin"), verify=cert) as admin:
                        return admin.status(url)

                assert (await trio.to_thread.run_sync(sdk_status))["role"] == "leader"
            finally:
                stop.set()

    trio.run(main)
