"""Start the exec service: its backends and its servicer."""

from __future__ import annotations

import grpc

from dispatch.exec.computers import Computers
from dispatch.exec.local import LocalBackend
from dispatch.exec.service import ExecServicer
from dispatch.shared.config import ExecConfig
from dispatch.shared.server import Hosted, Service, start_server
from dispatch.v1 import exec_pb2_grpc


async def start(cfg: ExecConfig) -> Hosted:
    """Start the exec service on ``cfg.listen``; stopping the server kills every running spawn."""
    computers = Computers(local=LocalBackend(cfg), cfg=cfg)
    servicer = ExecServicer(computers)

    def register(server: grpc.aio.Server) -> None:
        exec_pb2_grpc.add_ExecServicer_to_server(servicer, server)

    hosted = await start_server([Service(name="dispatch.v1.Exec", register=register)], cfg.listen)
    # A stopping exec ends the kernels' sessions at once instead of waiting out its grace.
    hosted.on_stop.append(servicer.sessions.drain)
    hosted.closers.append(computers.aclose)
    return hosted
