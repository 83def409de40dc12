"""`switch merchant|terminal-admin|txn|settlement ...`: merchant services from the command line.

The database is the ledger's: --db PATH (SQLite), --dsn DSN (PostgreSQL) or --config switch.toml (its
[ledger], [admin] and [merchant_services] sections). JSON on stdout; errors on stderr. Exit status: 0 ok,
1 refused by a rule or not found, 2 usage/storage error.

Commands that post to the ledger (register, renew, cancel-renewal, deposit --apply, cutover) need the
ledger's one writer. While `switch run` is up that writer is the switch's, so they are forwarded to its
admin API: with --config whose [admin] is enabled, the API at that address is probed first and used
when it answers (token from the environment variable [admin] token_env names, as the switch reads
it); `--api URL` forces the API, `--offline` forces a local writer. Offline, the command opens its
own writer (it needs the checkpoint signing key, as `switch run` does), and the ledger refuses it
while another writer holds the database, naming that process.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from switch.config import (
    AdminConfig,
    ConfigError,
    LedgerConfig,
    MerchantServicesConfig,
    SwitchConfig,
    load_config,
)

ACTOR_HELP = "who is making the change (recorded in the audit); default: $USER or 'cli'"


def register(subparsers: Any) -> None:
    def group(name: str, help_text: str) -> Any:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        return p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")

    def cmd(sub: Any, name: str, handler: Callable[..., Any], help_text: str, *, posts: bool = False) -> Any:
        c = sub.add_parser(name, help=help_text, description=help_text)
        where = c.add_mutually_exclusive_group()
        where.add_argument("--db", help="SQLite database (the ledger's)")
        where.add_argument("--dsn", help="PostgreSQL connection string")
        c.add_argument("--config", help="switch.toml")
        c.add_argument("--actor", default="", help=ACTOR_HELP)
        if posts:
            via = c.add_mutually_exclusive_group()
            via.add_argument("--api", metavar="URL", help="post through this running switch's admin API")
            via.add_argument(
                "--offline", action="store_true", help="post with a local ledger writer (switch stopped)"
            )
        c.set_defaults(handler=lambda args: _run(args, handler, posts))
        return c

    m = group("merchant", "merchants, contracts and the registry audit")
    c = cmd(m, "add", _merchant_add, "create a merchant")
    c.add_argument("--id", required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--mcc", required=True, help="4-digit merchant category code")
    c.add_argument("--currency", required=True, help="ISO 4217 numeric")
    c = cmd(m, "update", _merchant_update, "change a merchant's name, MCC or status")
    c.add_argument("--id", required=True)
    c.add_argument("--name")
    c.add_argument("--mcc")
    c.add_argument("--status", choices=["open", "closed"])
    c = cmd(m, "show", _merchant_show, "one merchant and its contract")
    c.add_argument("--id", required=True)
    cmd(m, "list", _merchant_list, "all merchants")
    c = cmd(
        m, "contract", _contract_put, "create or replace a contract from a JSON file (see docs/merchant.md)"
    )
    c.add_argument("file", type=Path, help="contract JSON (fields of switch.merchant.model.Contract)")
    c = cmd(m, "audit", _audit, "registry audit entries")
    c.add_argument("--kind", help="merchant, contract, terminal, key, renewal, cutover")
    c.add_argument("--object-id")

    t = group("terminal-admin", "terminal registry: register, lifecycle, subscription, deposit, keys")
    c = cmd(
        t,
        "register",
        _terminal_register,
        "register a terminal (charges deposit and first period)",
        posts=True,
    )
    c.add_argument("--id", required=True)
    c.add_argument("--merchant", required=True)
    c.add_argument("--profile", default="terminal_ascii")
    c = cmd(t, "show", _terminal_show, "one terminal, its renewals and deposit evaluation")
    c.add_argument("--id", required=True)
    c = cmd(t, "list", _terminal_list, "terminals (of one merchant)")
    c.add_argument("--merchant")
    c = cmd(t, "state", _terminal_state, "lifecycle transition (deactivated, returned)")
    c.add_argument("--id", required=True)
    c.add_argument("--to", required=True, choices=["deactivated", "returned"])
    c.add_argument("--reason", default="")
    c = cmd(t, "renew", _terminal_renew, "pay one subscription period", posts=True)
    c.add_argument("--id", required=True)
    c = cmd(t, "cancel-renewal", _terminal_cancel, "cancel a renewal within its refund window", posts=True)
    c.add_argument("--id", required=True)
    c.add_argument("--rrn", required=True)
    c = cmd(
        t, "deposit", _terminal_deposit, "evaluate the deposit rule (--apply posts the outcome)", posts=True
    )
    c.add_argument("--id", required=True)
    c.add_argument("--apply", action="store_true")
    c = cmd(t, "add-key", _terminal_key, "add a master key in its encrypted storage form")
    c.add_argument("--id", required=True)
    c.add_argument("--index", type=int, default=0)
    c.add_argument("--encrypted-hex", required=True)
    c.add_argument("--check-value", default="")

    x = group("txn", "transaction status from the ledger")
    c = cmd(x, "status", _txn_status, "state by --rrn, or by --terminal and --stan")
    c.add_argument("--rrn")
    c.add_argument("--terminal")
    c.add_argument("--stan")

    s = group("settlement", "cutover, settlement reports and terminal reconciliation")
    c = cmd(s, "report", _settle_report, "per-merchant settlement report of a batch")
    c.add_argument("--to-seq", type=int, help="the batch closed at this seq (default: the open batch)")
    c.add_argument("--format", choices=["json", "csv"], default="json")
    cmd(s, "cutover", _settle_cutover, "close the batch and post settlement entries", posts=True)
    c = cmd(s, "reconcile", _settle_reconcile, "compare terminal totals (JSON file) with the ledger")
    c.add_argument("file", type=Path, help="JSON of switch.merchant.settlement.TerminalTotals")


# --- plumbing ------------------------------------------------------------------------------------
def _out(obj: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() + "\n")


def _actor(args: argparse.Namespace) -> str:
    import getpass

    if args.actor:
        return str(args.actor)
    try:
        return getpass.getuser()
    except Exception:
        return "cli"


def _run(args: argparse.Namespace, handler: Callable[..., Any], posts: bool) -> int:
    from switch.ledger.backend import LedgerStorageError
    from switch.ledger.factory import open_backend, open_writer
    from switch.ledger.keys import LedgerKeyError
    from switch.ledger.queries import LedgerReader
    from switch.merchant.lifecycle import LifecycleError
    from switch.merchant.model import RegistryError
    from switch.merchant.service import MerchantService
    from switch.merchant.store import RegistryStore
    from switch.merchant.subscription import RenewalRefused

    if posts and getattr(args, "apply", True) is not False:
        try:
            target = _api_target(args)
        except (ConfigError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if target is not None:
            return _forward(args, handler, *target)
    try:
        lcfg, mcfg = _configs(args)
        store = (
            RegistryStore.open_postgres(lcfg.dsn)
            if lcfg.backend == "postgres"
            else RegistryStore.open_sqlite(lcfg.path)
        )
    except (ConfigError, OSError, LedgerStorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    writer = reader = None
    try:
        reader = LedgerReader(open_backend(lcfg))
        writer = open_writer(lcfg) if posts and getattr(args, "apply", True) is not False else None
        svc = MerchantService(store, reader, writer, mcfg, lambda: time.time_ns() // 1_000_000)
        result = handler(svc, args, _actor(args))
        if result is not None:
            if isinstance(result, str):
                sys.stdout.write(result)
            else:
                _out(result)
        return 0
    except (RegistryError, RenewalRefused, LifecycleError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except (LedgerStorageError, LedgerKeyError, msgspec.ValidationError, msgspec.DecodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if writer is not None:
            writer.close()
        if reader is not None:
            reader.close()
        store.close()


# --- forwarding to a running switch's admin API ----------------------------------------------------
def _api_target(args: argparse.Namespace) -> tuple[str, AdminConfig, MerchantServicesConfig] | None:
    """(base URL, admin config, limits) when this posting command goes through the admin API, else
    None (local writer): --offline -> None; --api URL -> that URL; --config with [admin] enabled ->
    its address if the API answers a probe."""
    if args.offline:
        return None
    cfg = load_config(args.config) if args.config else SwitchConfig()
    if args.api:
        return args.api.rstrip("/"), cfg.admin, cfg.merchant_services
    if not cfg.admin.enabled:
        return None
    host = cfg.admin.host if cfg.admin.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{host}:{cfg.admin.port}" if ":" not in host else f"http://[{host}]:{cfg.admin.port}"
    try:  # the API description needs no token: a cheap "is the switch up" question
        _http("GET", url + "/openapi.json", None, {}, cfg.merchant_services.cli_api_probe_timeout_ms / 1000)
    except OSError:
        return None
    return url, cfg.admin, cfg.merchant_services


def _api_request(handler: Callable[..., Any], a: argparse.Namespace) -> tuple[str, str, Any]:
    """The admin API call that does what `handler` does locally: (method, path, JSON body or None)."""
    from urllib.parse import quote

    def tid() -> str:
        return quote(a.id, safe="")

    if handler is _terminal_register:
        return "POST", "/terminals", {"id": a.id, "merchant_id": a.merchant, "profile": a.profile}
    if handler is _terminal_renew:
        return "POST", f"/terminals/{tid()}/renew", None
    if handler is _terminal_cancel:
        return "POST", f"/terminals/{tid()}/renewals/cancel", {"rrn": a.rrn}
    if handler is _terminal_deposit:
        return "POST", f"/terminals/{tid()}/deposit", None
    if handler is _settle_cutover:
        return "POST", "/cutover", None
    raise AssertionError(f"no admin API route for {handler.__name__}")


def _http(method: str, url: str, body: Any, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
    """One HTTP exchange (stdlib: the command line needs no HTTP client dependency). Returns the status
    and body of any HTTP answer; raises OSError when there is no answer (refused, timed out)."""
    import urllib.error
    import urllib.request

    data = None if body is None else msgspec.json.encode(body)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise TimeoutError(str(exc.reason)) from None
        raise OSError(f"cannot reach the admin API at {url}: {exc.reason}") from None


def _forward(
    args: argparse.Namespace,
    handler: Callable[..., Any],
    base_url: str,
    admin: AdminConfig,
    limits: MerchantServicesConfig,
) -> int:
    import os

    token = os.environ.get(admin.token_env, "")
    if not token:
        print(f"error: the admin API needs its token: set ${admin.token_env}", file=sys.stderr)
        return 2
    method, path, body = _api_request(handler, args)
    headers = {"Authorization": f"Bearer {token}", "X-Actor": _actor(args)}
    try:
        status, raw = _http(method, base_url + path, body, headers, float(limits.cli_api_timeout_s))
    except TimeoutError:
        # The request may have reached the switch and been posted: never let a retry look safe.
        print(
            f"outcome unknown: the admin API did not answer {method} {path} within "
            f"{limits.cli_api_timeout_s} s; it may have been applied -- look it up (show/status/audit) "
            "before trying again",
            file=sys.stderr,
        )
        return 3
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        answer = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        answer = {"error": raw[:200].decode("utf-8", "replace")}
    if status == 200:
        _out(answer)
        return 0
    text = answer.get("error", answer) if isinstance(answer, dict) else answer
    if status in (404, 409, 422):
        print(f"refused: {text}", file=sys.stderr)
        return 1
    print(f"error: admin API answered {status}: {text}", file=sys.stderr)
    return 2


def _configs(args: argparse.Namespace) -> tuple[LedgerConfig, MerchantServicesConfig]:
    if args.config:
        cfg = load_config(args.config)
        lcfg, mcfg = cfg.ledger, cfg.merchant_services
    else:
        lcfg, mcfg = LedgerConfig(), MerchantServicesConfig()
    if args.db:
        lcfg = msgspec.structs.replace(lcfg, backend="sqlite", path=args.db)
    elif args.dsn:
        lcfg = msgspec.structs.replace(lcfg, backend="postgres", dsn=args.dsn)
    return lcfg, mcfg


# --- handlers ------------------------------------------------------------------------------------
def _merchant_add(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant.model import Merchant

    return svc.create_merchant(Merchant(id=a.id, name=a.name, mcc=a.mcc, currency=a.currency), actor)


def _merchant_update(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    changes = {k: v for k, v in (("name", a.name), ("mcc", a.mcc), ("status", a.status)) if v is not None}
    return svc.update_merchant(a.id, actor, **changes)


def _merchant_show(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    m, _ = svc.merchant(a.id)
    contract = svc.contract_for(a.id) if m.contract_id else None
    return {"merchant": m, "contract": contract}


def _merchant_list(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant.model import Merchant

    return svc.store.list("merchant", Merchant, limit=svc.cfg.max_list_rows)


def _contract_put(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant.model import Contract

    return svc.put_contract(msgspec.json.decode(a.file.read_bytes(), type=Contract), actor)


def _audit(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    return svc.store.audit(object_kind=a.kind, object_id=a.object_id, limit=svc.cfg.max_list_rows)


def _terminal_register(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    return svc.register_terminal(a.id, a.merchant, actor, a.profile)


def _terminal_show(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    t, _ = svc.terminal(a.id)
    return {
        "terminal": t,
        "renewals": svc.renewals(a.id),
        "deposit": svc.evaluate_deposit(a.id, actor, apply=False) if t.deposit_rrn else None,
    }


def _terminal_list(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant.model import Terminal

    return svc.store.list("terminal", Terminal, owner=a.merchant, limit=svc.cfg.max_list_rows)


def _terminal_state(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant.model import TerminalState

    return svc.set_state(a.id, TerminalState(a.to), actor, a.reason)


def _terminal_renew(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    return svc.renew(a.id, actor)


def _terminal_cancel(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    return svc.cancel_renewal(a.id, a.rrn, actor)


def _terminal_deposit(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    return svc.evaluate_deposit(a.id, actor, apply=a.apply)


def _terminal_key(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant.model import TerminalKey

    k = svc.add_key(
        TerminalKey(
            terminal_id=a.id, key_index=a.index, encrypted_hex=a.encrypted_hex, check_value=a.check_value
        ),
        actor,
    )
    return {"terminal_id": k.terminal_id, "key_index": k.key_index, "check_value": k.check_value}


def _txn_status(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant.model import RegistryError

    if a.rrn:
        return svc.status(a.rrn)
    if a.terminal and a.stan:
        return svc.status_by_stan(a.terminal, a.stan)
    raise RegistryError("give --rrn, or --terminal and --stan")


def _settle_report(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant import settlement

    rows = svc.report(a.to_seq)
    return settlement.to_csv(rows) if a.format == "csv" else rows


def _settle_cutover(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    cut, rows = svc.cutover(actor)
    return {"cutover": cut, "merchants": rows}


def _settle_reconcile(svc: Any, a: argparse.Namespace, actor: str) -> Any:
    from switch.merchant.settlement import TerminalTotals

    return svc.reconcile(msgspec.json.decode(a.file.read_bytes(), type=TerminalTotals))
