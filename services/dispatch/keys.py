"""``dispatchd keys create|list|revoke``: API keys, straight in the store's database.

Works whether or not the services run (SQLite in WAL mode and PostgreSQL both
take a second writer). The secret of a new key is printed once, to stdout, and
never again: only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dispatch.shared import config
from dispatch.shared.errors import DispatchError
from dispatch.store.server import open_store
from dispatch.v1 import store_pb2

DEFAULT_TENANT = "local"


def add_parser(sub: argparse._SubParsersAction[Any], log_level: Callable[[str], str]) -> None:
    # Where the database is: given before the action (`keys --data-dir D create`) or after it
    # (`keys create --data-dir D`); the copies after it default to SUPPRESS, so they do not
    # undo what came before.
    def where(p: argparse.ArgumentParser, default: Callable[[object], object]) -> None:
        p.add_argument(
            "--database-url",
            default=default(None),
            help="the store's database (env: DISPATCH_DATABASE_URL)",
        )
        p.add_argument(
            "--data-dir",
            type=Path,
            default=default(None),
            help="where `up` keeps SQLite (env: DISPATCH_DATA_DIR; default ./.dispatch)",
        )
        p.add_argument("--log-level", type=log_level, default=default("WARNING"))
        p.add_argument("--config", default=default(None), help="TOML config file (env: DISPATCH_CONFIG)")

    p = sub.add_parser("keys", help="create, list and revoke API keys")
    where(p, lambda value: value)
    after = argparse.ArgumentParser(add_help=False)
    where(after, lambda _value: argparse.SUPPRESS)
    keys = p.add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="make a key; its secret is printed once", parents=[after])
    create.add_argument(
        "--tenant", default=DEFAULT_TENANT, help=f"the key's tenant (default {DEFAULT_TENANT})"
    )
    create.add_argument("--name", default="", help="a label to tell keys apart")
    listing = keys.add_parser("list", help="keys (never their secrets)", parents=[after])
    listing.add_argument("--tenant", default="", help="only this tenant's keys")
    revoke = keys.add_parser(
        "revoke", help="revoke a key by id; it stops working within seconds", parents=[after]
    )
    revoke.add_argument("key_id")


def database_url(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    if args.database_url:
        return str(args.database_url)
    return config.local_database_url(config.data_dir(args.data_dir, env), env)


def _describe(key: store_pb2.ApiKey) -> str:
    state = "revoked" if key.revoked else "active"
    return f"{key.id}  tenant={key.tenant_id}  prefix={key.prefix}  {state}  {key.name}"


async def _run(args: argparse.Namespace, url: str) -> int:
    store = await open_store(url, default_workspace_root=".")
    try:
        if args.action == "create":
            key, secret = await store.create_api_key(args.tenant, args.name)
            print(secret)
            print(f"created {_describe(key)}; the secret above is shown only once", file=sys.stderr)
        elif args.action == "list":
            for key in await store.list_api_keys(args.tenant):
                print(_describe(key))
        else:
            print(_describe(await store.revoke_api_key(args.key_id)))
    finally:
        await store.close()
    return 0


def main(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    url = database_url(args, env)
    try:
        return asyncio.run(_run(args, url))
    except DispatchError as exc:
        print(f"dispatchd keys {args.action}: {exc}", file=sys.stderr)
        return 1
