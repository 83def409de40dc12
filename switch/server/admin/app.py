"""Admin HTTP API: transaction status, merchants, contracts, terminals (register, state, renew, cancel
renewal, deposit evaluation, keys), settlement report, cutover, reconciliation, audit.

Why this stack: Starlette (routing, requests) runs on anyio, whose trio backend lets it live in the
switch's trio process; hypercorn's trio worker serves it (HTTP/1.1 and h2, timeouts, limits) -- no
hand-written HTTP. Bodies are msgspec Structs, decoded once at the boundary; the OpenAPI description at
/openapi.json is generated from the same types (msgspec.json.schema_components), so it cannot drift.

Auth: every route but /openapi.json needs `Authorization: Bearer <token>`; the token comes from the
environment variable named by AdminConfig.token_env and is compared in constant time. No token
configured: the API refuses to start (an admin API without auth is never what anyone wants). The
actor recorded in the audit is the `X-Actor` header (default "admin-api").

The service is blocking (SQLite/psycopg, ledger appends wait for fsync): calls run in a worker thread,
one at a time (the registry connection is used by one thread at a time).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from switch.codec.masking import scrub_text
from switch.config import AdminConfig, MerchantServicesConfig
from switch.merchant import settlement
from switch.merchant.deposit import DepositEvaluation
from switch.merchant.lifecycle import LifecycleError
from switch.merchant.model import (
    AuditRecord,
    Contract,
    Merchant,
    MerchantStatus,
    RegistryError,
    Renewal,
    Terminal,
    TerminalKey,
    TerminalState,
)
from switch.merchant.refusals import Refusal, RefusalLog
from switch.merchant.service import MerchantService, NotFound
from switch.merchant.store import Cutover, RegistryConflict
from switch.merchant.subscription import RenewalRefused

log = logging.getLogger("switch.admin")
_ACTOR_RE = re.compile(r"^[A-Za-z0-9_.@\-]{1,64}$")


# --- bodies --------------------------------------------------------------------------------------
class Error(msgspec.Struct, frozen=True):
    error: str


class MerchantIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    name: str
    mcc: str
    currency: str


class MerchantPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str | None = None
    mcc: str | None = None
    status: MerchantStatus | None = None


class TerminalIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    merchant_id: str
    profile: str = "terminal_ascii"


class StateChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    state: TerminalState
    reason: str = ""


class CancelRenewal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rrn: str


class CutoverOut(msgspec.Struct, frozen=True):
    cutover: Cutover
    merchants: list[settlement.MerchantSettlement]


BODY_TYPES: tuple[Any, ...] = (
    Error, MerchantIn, MerchantPatch, Merchant, Contract, TerminalIn, Terminal, StateChange, TerminalKey,
    Renewal, CancelRenewal, DepositEvaluation, settlement.TxnStatus, settlement.MerchantSettlement,
    settlement.TerminalTotals, settlement.Reconciliation, CutoverOut, AuditRecord, Refusal,
)  # fmt: skip

#: (method, path, summary, request body type, response type) for the OpenAPI description.
OPERATIONS: list[tuple[str, str, str, Any, Any]] = [
    ("get", "/transactions/{rrn}", "Transaction state by RRN", None, settlement.TxnStatus),
    (
        "get",
        "/terminals/{tid}/stan/{stan}",
        "Transactions by terminal + STAN",
        None,
        list[settlement.TxnStatus],
    ),
    ("get", "/merchants", "List merchants", None, list[Merchant]),
    ("post", "/merchants", "Create a merchant", MerchantIn, Merchant),
    ("get", "/merchants/{mid}", "One merchant", None, Merchant),
    ("patch", "/merchants/{mid}", "Change name, MCC or status", MerchantPatch, Merchant),
    ("put", "/contracts/{cid}", "Create or replace a contract (becomes the merchant's)", Contract, Contract),
    ("get", "/contracts/{cid}", "One contract", None, Contract),
    ("get", "/terminals", "List terminals (?merchant_id=)", None, list[Terminal]),
    ("post", "/terminals", "Register a terminal (charges deposit and first period)", TerminalIn, Terminal),
    ("get", "/terminals/{tid}", "One terminal with its lifecycle state", None, Terminal),
    (
        "get",
        "/terminals/{tid}/refusals",
        "Recent requests refused before processing (e.g. 58: never signed on); newest last",
        None,
        list[Refusal],
    ),
    ("post", "/terminals/{tid}/state", "Lifecycle transition (deactivate, return)", StateChange, Terminal),
    ("post", "/terminals/{tid}/renew", "Pay one subscription period", None, Renewal),
    ("get", "/terminals/{tid}/renewals", "Renewals of a terminal", None, list[Renewal]),
    (
        "post",
        "/terminals/{tid}/renewals/cancel",
        "Cancel a renewal within its refund window",
        CancelRenewal,
        Renewal,
    ),
    ("get", "/terminals/{tid}/deposit", "Evaluate the deposit rule (no posting)", None, DepositEvaluation),
    (
        "post",
        "/terminals/{tid}/deposit",
        "Evaluate and post the outcome once decided",
        None,
        DepositEvaluation,
    ),
    ("post", "/terminals/{tid}/keys", "Add an encrypted master key", TerminalKey, TerminalKey),
    (
        "get",
        "/settlement",
        "Settlement report (?to_seq= closed batch; ?format=csv)",
        None,
        list[settlement.MerchantSettlement],
    ),
    ("post", "/cutover", "Close the batch and post settlement entries", None, CutoverOut),
    (
        "post",
        "/reconcile",
        "Reconcile terminal totals (0500) with the ledger",
        settlement.TerminalTotals,
        settlement.Reconciliation,
    ),
    ("get", "/audit", "Registry audit (?object_kind=&object_id=)", None, list[AuditRecord]),
]


def openapi() -> dict[str, Any]:
    """OpenAPI 3.1 document built from the msgspec types of OPERATIONS."""
    types = [t for _, _, _, req, resp in OPERATIONS for t in (req, resp) if t is not None] + [Error]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    it = iter(schemas)
    paths: dict[str, dict[str, Any]] = {}
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for method, path, summary, req, _resp in OPERATIONS:
        req_schema = next(it) if req is not None else None
        resp_schema = next(it)
        op: dict[str, Any] = {
            "summary": summary,
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": resp_schema}}},
                "401": {"description": "missing or wrong token", **err},
                "404": {"description": "not found", **err},
                "409": {"description": "refused by a rule or a concurrent change", **err},
                "422": {"description": "invalid body or value", **err},
            },
        }
        params = re.findall(r"{(\w+)}", path)
        if params:
            op["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
            ]
        if req_schema is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": req_schema}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "switch admin API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# --- app -----------------------------------------------------------------------------------------
def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def _error(status: int, text: str) -> Response:
    return _json(Error(text), status)


def build_app(
    service: MerchantService,
    token: str,
    cfg: MerchantServicesConfig | None = None,
    refusals: RefusalLog | None = None,
) -> Starlette:
    """The ASGI app. `token`: the bearer token (non-empty). `refusals`: the running switch's record of
    requests refused before processing (none outside a switch)."""
    if not token:
        raise ValueError("admin API needs a non-empty token")
    limits = cfg or service.cfg
    token_b = token.encode()
    lock = anyio.Lock()
    spec = msgspec.json.encode(openapi())

    async def call(fn: Callable[[], Any]) -> Any:
        async with lock:
            return await anyio.to_thread.run_sync(fn)

    async def body(request: Request, type_: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_admin_body_bytes):
            raise _BadRequest(413, f"body above {limits.max_admin_body_bytes} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_admin_body_bytes:
                raise _BadRequest(413, f"body above {limits.max_admin_body_bytes} bytes")
        try:
            return msgspec.json.decode(raw, type=type_)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise _BadRequest(422, f"invalid body: {exc}") from None

    def route(method: str, path: str, handler: Callable[[Request, str], Awaitable[Any]]) -> Route:
        async def endpoint(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            given = auth[7:].encode() if auth.startswith("Bearer ") else b""
            if not hmac.compare_digest(given, token_b):
                return _error(401, "missing or wrong bearer token")
            actor = request.headers.get("x-actor", "admin-api")
            if not _ACTOR_RE.match(actor):
                return _error(422, "X-Actor must be 1-64 of A-Z a-z 0-9 _ . @ -")
            try:
                result = await handler(request, actor)
            except _BadRequest as exc:
                return _error(exc.status, exc.text)
            except NotFound as exc:
                return _error(404, str(exc))
            except (RegistryConflict, RenewalRefused, LifecycleError) as exc:
                return _error(409, str(exc))
            except RegistryError as exc:
                return _error(422, str(exc))
            except Exception:
                log.exception("admin %s %s failed", method, scrub_text(path))  # an id may be a PAN
                return _error(500, "internal error (see the switch log)")
            return result if isinstance(result, Response) else _json(result)

        return Route(path, endpoint, methods=[method.upper()])

    svc = service

    def q(request: Request, name: str, default: str = "") -> str:
        return request.query_params.get(name, default)

    async def get_txn(r: Request, a: str) -> Any:
        return await call(lambda: svc.status(r.path_params["rrn"]))

    async def get_stan(r: Request, a: str) -> Any:
        return await call(lambda: svc.status_by_stan(r.path_params["tid"], r.path_params["stan"]))

    async def list_merchants(r: Request, a: str) -> Any:
        return await call(
            lambda: svc.store.list("merchant", Merchant, after_id=q(r, "after"), limit=svc.cfg.max_list_rows)
        )

    async def create_merchant(r: Request, a: str) -> Any:
        m = await body(r, MerchantIn)
        return await call(
            lambda: svc.create_merchant(Merchant(id=m.id, name=m.name, mcc=m.mcc, currency=m.currency), a)
        )

    async def get_merchant(r: Request, a: str) -> Any:
        return (await call(lambda: svc.merchant(r.path_params["mid"])))[0]

    async def patch_merchant(r: Request, a: str) -> Any:
        p = await body(r, MerchantPatch)
        changes = {k: v for k, v in msgspec.structs.asdict(p).items() if v is not None}
        return await call(lambda: svc.update_merchant(r.path_params["mid"], a, **changes))

    async def put_contract(r: Request, a: str) -> Any:
        c = await body(r, Contract)
        if c.id != r.path_params["cid"]:
            raise _BadRequest(422, "contract id in the body differs from the path")
        return await call(lambda: svc.put_contract(c, a))

    async def get_contract(r: Request, a: str) -> Any:
        got = await call(lambda: svc.store.get("contract", r.path_params["cid"], Contract))
        if got is None:
            raise NotFound(f"no contract {r.path_params['cid']}")
        return got[0]

    async def list_terminals(r: Request, a: str) -> Any:
        owner = q(r, "merchant_id") or None
        return await call(
            lambda: svc.store.list(
                "terminal", Terminal, owner=owner, after_id=q(r, "after"), limit=svc.cfg.max_list_rows
            )
        )

    async def register(r: Request, a: str) -> Any:
        t = await body(r, TerminalIn)
        return await call(lambda: svc.register_terminal(t.id, t.merchant_id, a, t.profile))

    async def get_terminal(r: Request, a: str) -> Any:
        return (await call(lambda: svc.terminal(r.path_params["tid"])))[0]

    async def get_refusals(r: Request, a: str) -> Any:
        tid = r.path_params["tid"]
        await call(lambda: svc.terminal(tid))  # 404 for a terminal the registry does not know
        return refusals.of(tid) if refusals is not None else []

    async def set_state(r: Request, a: str) -> Any:
        s = await body(r, StateChange)
        return await call(lambda: svc.set_state(r.path_params["tid"], s.state, a, s.reason))

    async def renew(r: Request, a: str) -> Any:
        return await call(lambda: svc.renew(r.path_params["tid"], a))

    async def renewals(r: Request, a: str) -> Any:
        return await call(lambda: svc.renewals(r.path_params["tid"]))

    async def cancel(r: Request, a: str) -> Any:
        c = await body(r, CancelRenewal)
        return await call(lambda: svc.cancel_renewal(r.path_params["tid"], c.rrn, a))

    async def deposit_eval(r: Request, a: str) -> Any:
        return await call(lambda: svc.evaluate_deposit(r.path_params["tid"], a, apply=False))

    async def deposit_apply(r: Request, a: str) -> Any:
        return await call(lambda: svc.evaluate_deposit(r.path_params["tid"], a, apply=True))

    async def add_key(r: Request, a: str) -> Any:
        k = await body(r, TerminalKey)
        if k.terminal_id != r.path_params["tid"]:
            raise _BadRequest(422, "terminal id in the body differs from the path")
        return await call(lambda: svc.add_key(k, a))

    async def report(r: Request, a: str) -> Any:
        to_seq_text = q(r, "to_seq")
        if to_seq_text and not to_seq_text.isdigit():
            raise _BadRequest(422, "to_seq must be a number")
        rows = await call(lambda: svc.report(int(to_seq_text) if to_seq_text else None))
        if q(r, "format") == "csv":
            return Response(settlement.to_csv(rows), media_type="text/csv")
        return rows

    async def cutover(r: Request, a: str) -> Any:
        cut, rows = await call(lambda: svc.cutover(a))
        return CutoverOut(cut, rows)

    async def reconcile(r: Request, a: str) -> Any:
        t = await body(r, settlement.TerminalTotals)
        return await call(lambda: svc.reconcile(t))

    async def audit(r: Request, a: str) -> Any:
        return await call(
            lambda: svc.store.audit(
                object_kind=q(r, "object_kind") or None,
                object_id=q(r, "object_id") or None,
                limit=svc.cfg.max_list_rows,
            )
        )

    async def openapi_endpoint(request: Request) -> Response:
        return Response(spec, media_type="application/json")

    handlers = {
        ("get", "/transactions/{rrn}"): get_txn, ("get", "/terminals/{tid}/stan/{stan}"): get_stan,
        ("get", "/merchants"): list_merchants, ("post", "/merchants"): create_merchant,
        ("get", "/merchants/{mid}"): get_merchant, ("patch", "/merchants/{mid}"): patch_merchant,
        ("put", "/contracts/{cid}"): put_contract, ("get", "/contracts/{cid}"): get_contract,
        ("get", "/terminals"): list_terminals, ("post", "/terminals"): register,
        ("get", "/terminals/{tid}"): get_terminal, ("post", "/terminals/{tid}/state"): set_state,
        ("get", "/terminals/{tid}/refusals"): get_refusals,
        ("post", "/terminals/{tid}/renew"): renew, ("get", "/terminals/{tid}/renewals"): renewals,
        ("post", "/terminals/{tid}/renewals/cancel"): cancel,
        ("get", "/terminals/{tid}/deposit"): deposit_eval,
        ("post", "/terminals/{tid}/deposit"): deposit_apply,
        ("post", "/terminals/{tid}/keys"): add_key, ("get", "/settlement"): report,
        ("post", "/cutover"): cutover, ("post", "/reconcile"): reconcile, ("get", "/audit"): audit,
    }  # fmt: skip
    assert set(handlers) == {(m, p) for m, p, *_ in OPERATIONS}, "OPERATIONS and handlers disagree"
    # One Route per (path, method): Starlette tries the next route on a method mismatch (405 if none).
    routes = [Route("/openapi.json", openapi_endpoint, methods=["GET"])]
    routes += [route(m, p, h) for (m, p), h in handlers.items()]
    return Starlette(routes=routes)


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def admin_token(cfg: AdminConfig) -> str:
    token = os.environ.get(cfg.token_env, "")
    if not token:
        raise RuntimeError(f"admin API enabled but ${cfg.token_env} is empty: set a token")
    return token


async def serve_admin(
    config: AdminConfig,
    service: MerchantService,
    *,
    token: str | None = None,
    refusals: RefusalLog | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API until cancelled; `task_status.started(port)` once listening (port 0 binds a
    free port). For `nursery.start(serve_admin, cfg.admin, service)` in the server's wiring."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    app = build_app(service, token if token is not None else admin_token(config), refusals=refusals)
    hc = Config()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.accesslog = None
    hc.errorlog = log
    hc.keep_alive_timeout = 30

    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, hc, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        port = int(str(binds[0]).rsplit(":", 1)[1])
        log.info("admin API listening on %s:%d", config.host, port)
        task_status.started(port)
