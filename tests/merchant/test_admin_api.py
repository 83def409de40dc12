"""Admin API: auth, msgspec bodies and errors, OpenAPI from the types, and serving over TCP on trio."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import msgspec
import pytest
import trio

from switch.config import AdminConfig, MerchantServicesConfig
from switch.ledger.queries import LedgerReader
from switch.ledger.writer import LedgerWriter
from switch.merchant.model import DAY_MS
from switch.merchant.service import MerchantService
from switch.server.admin import build_app, serve_admin
from switch.server.admin.app import OPERATIONS
from tests.merchant.conftest import RegistryDb

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Actor": "alice"}
T0 = 1_700_000_000_000 - (1_700_000_000_000 % DAY_MS)


@pytest.fixture
def service(registry_db: RegistryDb) -> Iterator[MerchantService]:
    """Once per backend (SQLite, PostgreSQL)."""
    writer = LedgerWriter(registry_db.open_backend(), signing_key=None)
    reader = LedgerReader(registry_db.open_backend())
    store = registry_db.open_store()
    yield MerchantService(
        store, reader, writer, MerchantServicesConfig(max_admin_body_bytes=4096), lambda: T0
    )
    writer.close()
    reader.close()
    store.close()


class AppClient:
    """The admin app called in process through httpx's own ASGI transport, one `trio.run` per request.
    (starlette.testclient is deprecated with httpx and warns at import; the app has no lifespan.)"""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as c:
                return await c.request(method, url, **kw)

        return trio.run(send)

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PUT", url, **kw)


@pytest.fixture
def client(service: MerchantService) -> AppClient:
    return AppClient(build_app(service, TOKEN))


CONTRACT = {"id": "c1", "merchant_id": "M1", "currency": "978", "rates": {"default": {"bps": 120}},
            "subscription_fee_minor": 900, "deposit_minor": 2500}  # fmt: skip


def test_every_route_needs_the_token(client: AppClient) -> None:
    for method, path, *_ in OPERATIONS:
        url = path.replace("{", "").replace("}", "")
        r = client.request(method.upper(), url)
        assert r.status_code == 401, (method, path)
        assert r.json() == {"error": "missing or wrong bearer token"}
    assert client.get("/merchants", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/merchants", headers=AUTH).status_code == 200


def test_merchant_contract_terminal_flow_with_bodies_and_errors(client: AppClient) -> None:
    r = client.post(
        "/merchants", headers=AUTH, json={"id": "M1", "name": "Shop", "mcc": "5411", "currency": "978"}
    )
    assert r.status_code == 200 and r.json()["mcc"] == "5411"
    bad = client.post(
        "/merchants", headers=AUTH, json={"id": "M2", "name": "X", "mcc": "54", "currency": "978"}
    )
    assert bad.status_code == 422 and "mcc" in bad.json()["error"]
    unknown_field = client.post(
        "/merchants",
        headers=AUTH,
        json={"id": "M3", "name": "X", "mcc": "5411", "currency": "978", "extra": 1},
    )
    assert unknown_field.status_code == 422
    assert client.post("/merchants", headers=AUTH, content=b"{not json").status_code == 422
    assert client.post("/merchants", headers=AUTH, content=b"x" * 5000).status_code == 413
    dup = client.post(
        "/merchants", headers=AUTH, json={"id": "M1", "name": "S", "mcc": "5411", "currency": "978"}
    )
    assert dup.status_code == 409
    assert client.put("/contracts/c1", headers=AUTH, json=CONTRACT).status_code == 200
    assert client.get("/merchants/M1", headers=AUTH).json()["contract_id"] == "c1"
    t = client.post("/terminals", headers=AUTH, json={"id": "T1", "merchant_id": "M1"})
    assert t.status_code == 200 and t.json()["state"] == "registered" and t.json()["deposit_rrn"]
    assert client.get("/terminals/NOPE", headers=AUTH).status_code == 404
    renewals = client.get("/terminals/T1/renewals", headers=AUTH).json()
    assert len(renewals) == 1 and renewals[0]["amount_minor"] == 900
    ev = client.get("/terminals/T1/deposit", headers=AUTH).json()
    assert ev["result"] == "pending" and ev["deposit_minor"] == 2500
    bad_state = client.post("/terminals/T1/state", headers=AUTH, json={"state": "active"})
    assert bad_state.status_code == 409 and "registered -> active" in bad_state.json()["error"]
    gone = client.post("/terminals/T1/state", headers=AUTH, json={"state": "deactivated", "reason": "closed"})
    assert gone.json()["state"] == "deactivated"
    audit = client.get("/audit", headers=AUTH, params={"object_kind": "terminal", "object_id": "T1"}).json()
    assert {a["actor"] for a in audit} == {"alice"}
    assert [a["action"] for a in audit][-1] == "state deactivated"
    report = client.get("/settlement", headers=AUTH, params={"format": "csv"})
    assert report.headers["content-type"].startswith("text/csv")
    assert report.text.splitlines()[1].startswith("M1,978,")
    txn = client.get("/transactions/000000000001", headers=AUTH).json()
    assert txn["state"] == "pending"
    cut = client.post("/cutover", headers=AUTH).json()
    assert cut["merchants"][0]["net_payable_minor"] == -(2500 + 900)


def test_openapi_is_generated_from_the_types(client: AppClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert {"Merchant", "Contract", "Terminal", "TxnStatus", "MerchantSettlement", "Error"} <= set(
        doc["components"]["schemas"]
    )
    post = doc["paths"]["/merchants"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MerchantIn"
    }
    assert doc["components"]["schemas"]["Merchant"]["properties"]["mcc"]["type"] == "string"


def test_serve_admin_over_tcp_on_trio(service: MerchantService) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_admin, AdminConfig(port=0), service, token=TOKEN))

            def get(headers: dict[str, str]) -> httpx.Response:
                return httpx.get(f"http://127.0.0.1:{port}/merchants", headers=headers, timeout=10)

            assert (await trio.to_thread.run_sync(get, {})).status_code == 401
            ok = await trio.to_thread.run_sync(get, AUTH)
            assert ok.status_code == 200 and msgspec.json.decode(ok.content) == []
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_this_module_imports_without_a_warning() -> None:
    """Importing starlette.testclient with httpx (not httpx2) warns at import, before any test runs;
    this module must not depend on it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = "import tests.merchant.test_admin_api"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=root
    )
    assert done.returncode == 0, done.stderr[-2000:]
