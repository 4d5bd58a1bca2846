"""Start the conversation store: open its database, serve it, close it on stop."""

from __future__ import annotations

import logging

import grpc

from dispatch.shared.config import DEFAULT_POOL_SIZE, ConfigError, StoreConfig, parse_listen
from dispatch.shared.server import Hosted, Service, ensure_bindable, start_server
from dispatch.store.backend import Store
from dispatch.store.postgres import SCHEMES as POSTGRES_SCHEMES
from dispatch.store.postgres import PostgresStore
from dispatch.store.service import StoreServicer
from dispatch.store.sqlite import SQLiteStore
from dispatch.v1 import store_pb2_grpc

SERVICE_NAME = "dispatch.v1.ConversationStore"

log = logging.getLogger(__name__)


async def open_store(
    database_url: str, *, default_workspace_root: str, pool_size: int = DEFAULT_POOL_SIZE
) -> Store:
    """Open the backend ``database_url`` names: ``sqlite://`` or ``postgresql://`` (``postgres://``),
    the latter with at most ``pool_size`` connections (SQLite has one, on its own thread)."""
    usage = (
        "use sqlite:///relative/path, sqlite:////absolute/path"
        " or postgresql://user:password@host:port/database"
    )
    scheme, sep, _ = database_url.partition("://")
    if not sep:
        raise ConfigError(f"config key store.database_url must be a URL, got {database_url!r}; {usage}")
    if scheme == "sqlite":
        return await SQLiteStore.open(database_url, default_workspace_root=default_workspace_root)
    if scheme in POSTGRES_SCHEMES:
        return await PostgresStore.open(
            database_url, default_workspace_root=default_workspace_root, pool_size=pool_size
        )
    # Only the scheme is echoed: the rest of a database URL may carry a password.
    raise ConfigError(f"config key store.database_url: {scheme}:// databases are not supported yet; {usage}")


async def start(cfg: StoreConfig) -> Hosted:
    """Serve the store on ``cfg.listen``; ``Hosted.stop`` also closes the database."""
    if parse_listen(cfg.listen)[1] != 0:
        ensure_bindable(cfg.listen)  # before the database is opened and migrated for nothing
    store = await open_store(
        cfg.database_url, default_workspace_root=cfg.default_workspace_root, pool_size=cfg.pool_size
    )
    if cfg.pin_default_workspace:
        try:
            changed = await store.set_default_workspace_root(cfg.default_workspace_root)
        except BaseException:
            await store.close()
            raise
        if changed:
            log.info(
                "default workspace root is now %s (%d workspace(s) moved)",
                cfg.default_workspace_root,
                changed,
            )
    return await serve(store, cfg.listen)


async def serve(store: Store, listen: str) -> Hosted:
    """Serve an open backend on ``listen``; ``Hosted.stop`` closes it (and so does a failed start)."""
    servicer = StoreServicer(store)

    def register(server: grpc.aio.Server) -> None:
        store_pb2_grpc.add_ConversationStoreServicer_to_server(servicer, server)

    try:
        hosted = await start_server([Service(name=SERVICE_NAME, register=register)], listen)
    except BaseException:
        await store.close()
        raise
    # A stopping store ends the kernels' append streams at once (they open new ones, here
    # after a restart or elsewhere) instead of waiting out its grace for them.
    hosted.on_stop.append(servicer.append_streams.drain)
    hosted.closers.append(store.close)
    return hosted
