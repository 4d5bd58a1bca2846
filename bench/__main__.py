"""``python -m bench [dispatcher|store|exec|transport|steps|turn|rpc|scale] [options]``: one, or all.

Without a name, every benchmark runs with its defaults (options, as before, go
to the tool-dispatch scheduler benchmark alone), except ``turn``, whose peers
(LangGraph, the OpenAI Agents SDK) are an optional install, and ``scale``, which starts a
PostgreSQL server and a dozen processes for a few minutes: run them by name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from bench import dispatcher, exec, rpc, scale, steps, store, transport, turn

BENCHMARKS: dict[str, Callable[[Sequence[str]], int]] = {
    "dispatcher": dispatcher.main,
    "store": store.main,
    "exec": exec.main,
    "transport": transport.main,
    "steps": steps.main,
    "turn": turn.main,
    "rpc": rpc.main,
    "scale": scale.main,
}


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in BENCHMARKS:
        return BENCHMARKS[argv[0]](argv[1:])
    status = dispatcher.main(argv)
    if status == 0 and not argv:
        print()
        status = store.main(())
    if status == 0 and not argv:
        print()
        status = exec.main(())
    if status == 0 and not argv:
        print()
        status = transport.main(())
    if status == 0 and not argv:
        print()
        status = steps.main(())
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
