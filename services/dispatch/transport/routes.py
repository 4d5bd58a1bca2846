"""The HTTP bridge's routes, as data: what ``http.HttpBridge`` serves and ``openapi`` describes.

One table, so the router and the OpenAPI document cannot disagree: each route names
its handler (a method of ``HttpBridge``), the ``dispatch.v1.Dispatch`` RPC it
becomes, the query parameters it takes and whether it reads a JSON body (the RPC's
request message, less the fields the path gives).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONVERSATION = "/v1/conversations/{id}"
LIST = ("page_size", "page_token")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str
    # The Dispatch RPC this route calls; "" for the bridge's own (probes, the document).
    rpc: str = ""
    summary: str = ""
    query: tuple[str, ...] = ()
    body: bool = False
    # Path parameters, by the request field each fills: {"id": "conversation_id"}.
    params: dict[str, str] = field(default_factory=dict)
    # False: answered without an API key.
    auth: bool = True


_CONV = {"id": "conversation_id"}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/workspaces", "_list_workspaces", "ListWorkspaces", "List workspaces", LIST),
    Route("POST", "/v1/workspaces", "_create_workspace", "CreateWorkspace", "Create a workspace", body=True),
    Route(
        "POST",
        "/v1/conversations",
        "_create_conversation",
        "CreateConversation",
        "Create a conversation",
        body=True,
    ),
    Route(
        "GET",
        "/v1/conversations",
        "_list_conversations",
        "ListConversations",
        "List conversations",
        ("workspace_id", *LIST),
    ),
    Route("GET", CONVERSATION, "_get_conversation", "GetConversation", "Get a conversation", params=_CONV),
    Route(
        "PATCH",
        CONVERSATION,
        "_update_conversation",
        "UpdateConversation",
        "Change a conversation's title, agent or workspace",
        body=True,
        params=_CONV,
    ),
    Route(
        "DELETE",
        CONVERSATION,
        "_delete_conversation",
        "DeleteConversation",
        "Delete a conversation",
        params=_CONV,
    ),
    Route(
        "POST",
        CONVERSATION + "/messages",
        "_send",
        "Send",
        "Send a message (starts or queues a turn)",
        body=True,
        params=_CONV,
    ),
    Route(
        "GET",
        CONVERSATION + "/events",
        "_events",
        "Subscribe",
        "Stream the conversation's events (Server-Sent Events or NDJSON)",
        ("after_event_seq", "until", "stream_token"),
        params=_CONV,
    ),
    Route(
        "POST",
        CONVERSATION + "/stream-token",
        "_create_stream_token",
        "CreateStreamToken",
        "Mint a short-lived token that opens this conversation's event stream (for EventSource)",
        body=True,
        params=_CONV,
    ),
    Route(
        "POST",
        CONVERSATION + "/cancel",
        "_cancel",
        "Cancel",
        "Cancel the running turn",
        body=True,
        params=_CONV,
    ),
    Route(
        "GET",
        CONVERSATION + "/history",
        "_history",
        "History",
        "The conversation's messages",
        ("after_seq", "limit"),
        params=_CONV,
    ),
    Route(
        "GET",
        CONVERSATION + "/metrics",
        "_metrics",
        "Metrics",
        "Usage and timings",
        ("turn_id",),
        params=_CONV,
    ),
    Route(
        "GET",
        CONVERSATION + "/turns",
        "_list_turns",
        "ListTurns",
        "List turns",
        ("state", *LIST),
        params=_CONV,
    ),
    Route(
        "GET",
        CONVERSATION + "/turns/{turn_id}",
        "_get_turn",
        "GetTurn",
        "Get a turn",
        params={"id": "conversation_id", "turn_id": "turn_id"},
    ),
    Route(
        "GET",
        CONVERSATION + "/approvals",
        "_list_approvals",
        "ListApprovals",
        "List the conversation's approvals",
        ("pending",),
        params=_CONV,
    ),
    Route(
        "POST",
        "/v1/approvals/{id}/resolve",
        "_resolve_approval",
        "ResolveApproval",
        "Approve, reject or edit a pending tool call",
        body=True,
        params={"id": "approval_id"},
    ),
    Route("GET", "/v1/models", "_models", "Models", "The models and agents served"),
    Route("GET", "/v1/computers", "_computers", "Computers", "The computers tools can run on"),
    Route("GET", "/healthz", "_healthz", summary="The process serves HTTP", auth=False),
    Route("GET", "/readyz", "_readyz", summary="The transport and its backends serve", auth=False),
    Route("GET", "/openapi.json", "_openapi", summary="This document", auth=False),
)
