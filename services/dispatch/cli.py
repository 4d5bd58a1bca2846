"""``dispatchd``: run one service (``store``, ``exec``, ``kernel``, ``transport``),
all four as separate processes (``up``), or manage API keys (``keys``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import dispatch
from dispatch import keys
from dispatch.shared import config
from dispatch.shared.server import Hosted, run, serve_until_signalled

log = logging.getLogger("dispatchd")

DEFAULT_GRACE = 10.0


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level


def _grace(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{value!r}: the grace must be 0 or more seconds")
    return seconds


def _logging_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level", type=_log_level, default="INFO", help=f"one of {', '.join(LOG_LEVELS)} (default INFO)"
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (env: DISPATCH_CONFIG)")
    p.add_argument("--listen", help="address to listen on, host:port (port 0 picks a free one)")
    p.add_argument(
        "--grace", type=_grace, default=DEFAULT_GRACE, help="seconds to drain on SIGTERM (default 10)"
    )
    p.add_argument("--ready-file", type=Path, help="write the bound address here once serving")
    _logging_flags(p)


def _provider_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", choices=list(config.PROVIDER_KINDS), help="env: DISPATCH_PROVIDER")
    p.add_argument("--model", help="model name; implies --provider openai (env: DISPATCH_MODEL)")
    p.add_argument("--base-url", help="OpenAI-compatible base URL (env: DISPATCH_BASE_URL, OPENAI_BASE_URL)")
    p.add_argument("--script", help="script file for --provider scripted (env: DISPATCH_SCRIPT)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (and exit status 2), not the usage text and then the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="dispatchd", description=__doc__)
    top.add_argument("--version", action="version", version=f"dispatchd {dispatch.__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("store", help="the conversation store")
    _common(p)
    p.add_argument("--database-url", help="sqlite:///path (env: DISPATCH_DATABASE_URL)")
    p.add_argument(
        "--pool-size", help="PostgreSQL connections at most (env: DISPATCH_STORE_POOL_SIZE; default 8)"
    )
    p.add_argument("--workspace", help="root of the default workspace (env: DISPATCH_WORKSPACE)")

    p = sub.add_parser("exec", help="the execution backend (internal: keep it on loopback)")
    _common(p)

    p = sub.add_parser("kernel", help="the turn engine")
    _common(p)
    p.add_argument("--store", help="store address (env: DISPATCH_STORE_ADDRESS)")
    p.add_argument("--exec", help="exec address (env: DISPATCH_EXEC_ADDRESS)")
    p.add_argument(
        "--advertise",
        help="host:port transports reach this kernel at (env: DISPATCH_KERNEL_ADVERTISE; default: --listen)",
    )
    _provider_flags(p)

    p = sub.add_parser("transport", help="the public API")
    _common(p)
    p.add_argument(
        "--kernel",
        help="kernel address, or 'store': every kernel, found through the store"
        " (env: DISPATCH_KERNEL_ADDRESS)",
    )
    p.add_argument("--store", help="store address (env: DISPATCH_STORE_ADDRESS)")
    p.add_argument(
        "--http-listen", help="HTTP bridge address, host:port (env: DISPATCH_HTTP_LISTEN; default off)"
    )

    p = sub.add_parser("up", help="start all four services on loopback and stop them together")
    p.add_argument("--config", help="TOML config file (env: DISPATCH_CONFIG)")
    p.add_argument("--listen", help=f"transport address (default {config.DEFAULT_TRANSPORT_LISTEN})")
    p.add_argument("--data-dir", type=Path, help="where the SQLite database lives (default ./.dispatch)")
    p.add_argument(
        "--http-listen",
        help=f"HTTP bridge address (default {config.DEFAULT_HTTP_LISTEN}; `off` turns it off)",
    )
    p.add_argument("--workspace", help="root of the default workspace (default: the current directory)")
    p.add_argument(
        "--grace",
        type=_grace,
        default=DEFAULT_GRACE,
        help="seconds, in all, to drain on SIGTERM or Ctrl-C (default 10)",
    )
    _logging_flags(p)
    _provider_flags(p)

    keys.add_parser(sub, _log_level)
    return top


def _serve(label: str, args: argparse.Namespace, start: Callable[[], Awaitable[Hosted]]) -> int:
    listen = args.listen

    async def main() -> None:
        hosted = await start()
        await serve_until_signalled(
            hosted, listen=listen, grace=args.grace, ready_file=args.ready_file, label=label
        )

    run(main)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.command} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    env = config.environ()
    flags: dict[str, Any] = vars(args)
    try:
        file = config.load_file(args.config or env.get("DISPATCH_CONFIG"))
        if args.command == "keys":
            return keys.main(args, env)
        if args.command == "up":
            from dispatch.supervisor import up

            return up(args, env, file)
        if args.command == "store":
            from dispatch.store.server import start as start_store

            store_cfg = config.store_config(flags, env, file)
            args.listen = store_cfg.listen
            return _serve("store", args, lambda: start_store(store_cfg))
        if args.command == "exec":
            from dispatch.exec.server import start as start_exec

            exec_cfg = config.exec_config(flags, env, file)
            args.listen = exec_cfg.listen
            return _serve("exec", args, lambda: start_exec(exec_cfg))
        if args.command == "kernel":
            from dispatch.kernel.server import start as start_kernel

            kernel_cfg = config.kernel_config(flags, env, file)
            args.listen = kernel_cfg.listen
            log.info("provider: %s", kernel_cfg.provider.display)
            return _serve("kernel", args, lambda: start_kernel(kernel_cfg))
        from dispatch.transport.server import start as start_transport

        transport_cfg = config.transport_config(flags, env, file)
        args.listen = transport_cfg.listen
        return _serve("transport", args, lambda: start_transport(transport_cfg))
    except config.ConfigError as exc:
        print(f"dispatchd {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
