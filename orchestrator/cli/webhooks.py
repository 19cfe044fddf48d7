"""``atelier webhooks ...``: a tenant's webhook endpoints and their deliveries, through the client package.

create, list, get, update, delete, secret, rotate (endpoints); deliveries, delivery, replay, recover
(what was sent, and sending it again). Lists print a table (``--json``: one object per line); single
records print as JSON.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from atelier_client import Client
from atelier_client.wire.webhooks import EVENT_TYPES

from orchestrator.cli.client import UsageError, client_args, client_errors, make_client, print_json, usage

RELATIVE = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def add_webhooks_commands(sub: Any) -> None:
    group = sub.add_parser("webhooks", help="webhook endpoints: create, list, rotate secrets, deliveries, replay")
    group.set_defaults(run=usage(group))
    hooks = group.add_subparsers(dest="webhooks_command", metavar="ACTION")

    p = hooks.add_parser("create", help="register an endpoint (prints it with its signing secret)")
    client_args(p)
    p.add_argument("endpoint_url", metavar="URL", help="where to send the events (http or https)")
    p.add_argument("--event", action="append", choices=EVENT_TYPES, dest="events",
                   help="an event type to send (repeatable; default: every event)")
    p.add_argument("--description")
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    p.set_defaults(run=cmd_create)

    p = hooks.add_parser("list", help="the tenant's endpoints, newest first")
    client_args(p)
    p.add_argument("--json", action="store_true", help="one JSON endpoint per line instead of a table")
    p.set_defaults(run=cmd_list)

    p = hooks.add_parser("get", help="show an endpoint (JSON)")
    client_args(p)
    p.add_argument("endpoint_id")
    p.set_defaults(run=cmd_get)

    p = hooks.add_parser("update", help="change an endpoint's URL, events, description, or enable/disable it")
    client_args(p)
    p.add_argument("endpoint_id")
    p.add_argument("--endpoint-url", metavar="URL", help="send the events here from now on")
    p.add_argument("--event", action="append", choices=EVENT_TYPES, dest="events",
                   help="the event types to send from now on (repeatable)")
    p.add_argument("--all-events", action="store_true", help="send every event type")
    p.add_argument("--description")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--enable", action="store_true", help="enable it (clears an automatic disabling)")
    state.add_argument("--disable", action="store_true")
    p.set_defaults(run=cmd_update)

    p = hooks.add_parser("delete", help="remove an endpoint and its delivery records")
    client_args(p)
    p.add_argument("endpoint_id")
    p.set_defaults(run=cmd_delete)

    p = hooks.add_parser("secret", help="show an endpoint's signing secret")
    client_args(p)
    p.add_argument("endpoint_id")
    p.set_defaults(run=cmd_secret)

    p = hooks.add_parser("rotate", help="a new signing secret; the old one keeps signing during the grace period")
    client_args(p)
    p.add_argument("endpoint_id")
    p.add_argument("--grace", type=int, metavar="SECONDS",
                   help="how long the previous secret keeps signing too (default: the server's, 24 h)")
    p.set_defaults(run=cmd_rotate)

    p = hooks.add_parser("deliveries", help="an endpoint's deliveries, newest first, with their attempts")
    client_args(p)
    p.add_argument("endpoint_id")
    p.add_argument("--status", choices=["pending", "delivered", "dead"])
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON delivery per line instead of a table")
    p.set_defaults(run=cmd_deliveries)

    p = hooks.add_parser("delivery", help="one delivery with its payload and every attempt (JSON)")
    client_args(p)
    p.add_argument("endpoint_id")
    p.add_argument("delivery_id")
    p.set_defaults(run=cmd_delivery)

    p = hooks.add_parser("replay", help="send a delivered or dead delivery again (same webhook-id)")
    client_args(p)
    p.add_argument("endpoint_id")
    p.add_argument("delivery_id")
    p.set_defaults(run=cmd_replay)

    p = hooks.add_parser("recover", help="resend every dead delivery since a time")
    client_args(p)
    p.add_argument("endpoint_id")
    p.add_argument("--since", required=True,
                   help="ISO 8601 time (2026-01-31T12:00:00Z) or an age: 30m, 6h, 2d")
    p.set_defaults(run=cmd_recover)


def since_time(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 time (UTC when it names no zone) or an age such as ``6h``."""
    found = RELATIVE.match(text.strip())
    if found:
        return (now or datetime.now(UTC)) - timedelta(**{UNITS[found.group(2)]: int(found.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"--since {text!r}: give an ISO 8601 time (2026-01-31T12:00:00Z) or an age (30m, 6h, "
                         f"2d)") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _run(args: argparse.Namespace, action: Any) -> Any:
    with client_errors(args), make_client(args) as client:
        return action(client)


def cmd_create(args: argparse.Namespace) -> int:
    created = _run(args, lambda c: c.create_webhook_endpoint(args.endpoint_url, events=args.events,
                                                             description=args.description,
                                                             enabled=not args.disabled))
    print_json(created.model_dump(mode="json"))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    def every(client: Client) -> list[Any]:
        found: list[Any] = []
        cursor = None
        while True:
            page = client.list_webhook_endpoints(cursor=cursor, limit=200)
            found += page.data
            if not page.next_cursor:
                return found
            cursor = page.next_cursor

    endpoints = _run(args, every)
    if args.json:
        for e in endpoints:
            print(e.model_dump_json())
        return 0
    if not endpoints:
        print("(no webhook endpoints)")
        return 0
    rows: list[tuple[str, ...]] = [("ID", "URL", "EVENTS", "ENABLED", "FAILING SINCE")]
    rows += [(e.id, e.url, ",".join(e.events) or "all", "yes" if e.enabled else f"no ({e.disabled_reason})",
              _when(e.failing_since)) for e in endpoints]
    _table(rows)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    print_json(_run(args, lambda c: c.get_webhook_endpoint(args.endpoint_id)).model_dump(mode="json"))
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.endpoint_url:
        changes["url"] = args.endpoint_url
    if args.all_events and args.events:
        raise UsageError("give --event or --all-events, not both")
    if args.all_events or args.events:
        changes["events"] = [] if args.all_events else args.events
    if args.description is not None:
        changes["description"] = args.description
    if args.enable or args.disable:
        changes["enabled"] = bool(args.enable)
    if not changes:
        raise UsageError("nothing to change: give --endpoint-url, --event, --all-events, --description, "
                         "--enable or --disable")
    print_json(_run(args, lambda c: c.update_webhook_endpoint(args.endpoint_id, changes)).model_dump(mode="json"))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _run(args, lambda c: c.delete_webhook_endpoint(args.endpoint_id))
    print(f"deleted {args.endpoint_id}")
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    print_json(_run(args, lambda c: c.get_webhook_endpoint_secret(args.endpoint_id)).model_dump(mode="json"))
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    if args.grace is not None and args.grace < 0:
        raise UsageError("--grace must be 0 or more seconds")
    secret = _run(args, lambda c: c.rotate_webhook_endpoint_secret(args.endpoint_id,
                                                                   grace_period_seconds=args.grace))
    print_json(secret.model_dump(mode="json"))
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")

    def some(client: Client) -> list[Any]:
        found: list[Any] = []
        cursor = None
        while len(found) < args.limit:
            page = client.list_webhook_deliveries(args.endpoint_id, status=args.status, cursor=cursor,
                                                  limit=min(200, args.limit - len(found)))
            found += page.data
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        return found

    deliveries = _run(args, some)
    if args.json:
        for d in deliveries:
            print(d.model_dump_json())
        return 0
    if not deliveries:
        print("(no deliveries)")
        return 0
    rows: list[tuple[str, ...]] = [("ID", "EVENT", "STATUS", "ATTEMPTS", "LAST ANSWER", "CREATED", "JOB/BATCH")]
    for d in deliveries:
        last = d.attempts[-1] if d.attempts else None
        answer = "" if last is None else (str(last.status_code) if last.status_code else (last.error or "error"))
        rows.append((d.id, d.event_type, d.status, str(len(d.attempts)), answer[:40], _when(d.created_at),
                     d.job_id or d.batch_id or ""))
    _table(rows)
    return 0


def cmd_delivery(args: argparse.Namespace) -> int:
    found = _run(args, lambda c: c.get_webhook_delivery(args.endpoint_id, args.delivery_id))
    print_json(found.model_dump(mode="json"))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    found = _run(args, lambda c: c.replay_webhook_delivery(args.endpoint_id, args.delivery_id))
    print_json(found.model_dump(mode="json"))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    since = since_time(args.since)
    recovery = _run(args, lambda c: c.recover_webhook_deliveries(args.endpoint_id, since))
    print_json(recovery.model_dump(mode="json"))
    if recovery.more:
        print("atelier: more dead deliveries remain: run the same command again", file=sys.stderr, flush=True)
    return 0
