"""Python SDK for Dispatch, an agent runtime served over gRPC.

async with DispatchClient("127.0.0.1:7600") as client:
    conv = await client.create_conversation()
    sent = await client.send(conv.id, "what is in this workspace?")
    async for event in client.subscribe(conv.id, after_event_seq=sent.after_event_seq):
        ...
"""

from dispatch_client._proto import common_pb2 as types
from dispatch_client.client import DEFAULT_ADDRESS, DispatchClient, DispatchError

__all__ = ["DEFAULT_ADDRESS", "DispatchClient", "DispatchError", "types"]
