"""``ferrogate admin ...``: everyday tasks through a running gateway's admin API."""

import argparse
import json
import os
import sys
from typing import Any
from urllib.parse import quote

import httpx

__all__ = ["add_parser"]

DEFAULT_URL = "http://127.0.0.1:8001"
_LISTABLE = ("routes", "upstreams", "consumers", "plugins", "plans")


def add_parser(commands: Any) -> None:
    admin = commands.add_parser("admin", help="manage a running gateway through its admin API")
    admin.add_argument(
        "--admin-url",
        default=os.environ.get("FERROGATE_ADMIN_URL", DEFAULT_URL),
        help=f"the admin API (else $FERROGATE_ADMIN_URL, else {DEFAULT_URL})",
    )
    admin.add_argument("--token", help="an admin token (else $FERROGATE_ADMIN_TOKEN)")
    admin.add_argument("--json", action="store_true", help="print the API's answers as JSON")
    verbs = admin.add_subparsers(dest="verb", required=True, metavar="VERB")
    for kind in _LISTABLE:
        listing = verbs.add_parser(kind, help=f"list the {kind}")
        listing.add_argument("--name-prefix", metavar="P", help="only names starting with P")
        listing.set_defaults(admin=_list, kind=kind)
    consumer = verbs.add_parser("consumer", help="consumers: add, delete")
    consumer_verbs = consumer.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = consumer_verbs.add_parser("add", help="add a consumer")
    add.add_argument("name")
    add.add_argument("--plan", help="the consumer's plan")
    add.add_argument("--group", action="append", default=[], help="a group (repeatable)")
    add.set_defaults(admin=_consumer_add)
    delete = consumer_verbs.add_parser("delete", help="delete a consumer")
    delete.add_argument("name")
    delete.set_defaults(admin=_consumer_delete)
    key = verbs.add_parser("key", help="API keys: issue, revoke")
    key_verbs = key.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = key_verbs.add_parser("issue", help="issue a new API key (printed once)")
    issue.add_argument("consumer")
    issue.set_defaults(admin=_key_issue)
    revoke = key_verbs.add_parser("revoke", help="revoke an API key by its id")
    revoke.add_argument("consumer")
    revoke.add_argument("id")
    revoke.set_defaults(admin=_key_revoke)
    admin.set_defaults(handler=run_admin)


def run_admin(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("FERROGATE_ADMIN_TOKEN")
    if not token:
        print("ferrogate admin: give --token or set FERROGATE_ADMIN_TOKEN", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=args.admin_url, headers=headers, timeout=30.0) as client:
            status: int = args.admin(client, args)
            return status
    except httpx.TransportError as e:
        print(f"ferrogate admin: cannot reach {args.admin_url}: {e}", file=sys.stderr)
        return 1


def _failed(r: httpx.Response) -> bool:
    if r.is_success:
        return False
    try:
        error = r.json()["error"]
        print(f"ferrogate admin: {r.status_code} {error['message']}", file=sys.stderr)
        for p in error.get("problems") or []:
            print(f"  {p['path']}: {p['message']}", file=sys.stderr)
    except (ValueError, KeyError, TypeError):
        print(f"ferrogate admin: {r.status_code} {r.text.strip()}", file=sys.stderr)
    return True


def _list(client: httpx.Client, args: argparse.Namespace) -> int:
    params: dict[str, str | int] = {"limit": 1000}
    if args.name_prefix:
        params["name_prefix"] = args.name_prefix
    items: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        r = client.get(f"/{args.kind}", params={**params, "offset": offset})
        if _failed(r):
            return 1
        page = r.json()
        items += page["data"]
        offset = page["next_offset"]
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    for item in items:
        print(f"{item['name']}\t{_summary(args.kind, item)}")
    return 0


def _summary(kind: str, item: dict[str, Any]) -> str:
    if kind == "routes":
        methods = ",".join(item.get("methods") or []) or "*"
        return f"{methods} {' '.join(item.get('paths') or [])} -> {item.get('upstream')}"
    if kind == "upstreams":
        return " ".join(f"{t['address']}*{t['weight']}" for t in item.get("targets") or [])
    if kind == "consumers":
        plan = item.get("plan") or "-"
        return f"plan={plan} credentials={len(item.get('credentials') or [])}"
    return json.dumps({k: v for k, v in item.items() if k != "name"}, separators=(",", ":"))


def _consumer_add(client: httpx.Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.plan:
        body["plan"] = args.plan
    if args.group:
        body["groups"] = args.group
    r = client.post("/consumers", json=body)
    if _failed(r):
        return 1
    print(json.dumps(r.json()) if args.json else f"consumer {args.name} added")
    return 0


def _consumer_delete(client: httpx.Client, args: argparse.Namespace) -> int:
    r = client.delete(f"/consumers/{quote(args.name, safe='')}")
    if _failed(r):
        return 1
    print(f"consumer {args.name} deleted")
    return 0


def _key_issue(client: httpx.Client, args: argparse.Namespace) -> int:
    r = client.post(
        f"/consumers/{quote(args.consumer, safe='')}/credentials", json={"type": "key-auth"}
    )
    if _failed(r):
        return 1
    cred = r.json()
    if args.json:
        print(json.dumps(cred))
    else:
        print(cred["key"])
        print(
            f"(key id {cred['id']} for {args.consumer}; the key is not shown again)",
            file=sys.stderr,
        )
    return 0


def _key_revoke(client: httpx.Client, args: argparse.Namespace) -> int:
    consumer = quote(args.consumer, safe="")
    r = client.delete(f"/consumers/{consumer}/credentials/{quote(args.id, safe='')}")
    if _failed(r):
        return 1
    print(f"key {args.id} of {args.consumer} revoked")
    return 0
