"""The conversation store: workspaces, conversations, messages, events and turns.

``backend.Store`` is the interface every database backend implements (SQLite
now, PostgreSQL later); ``service.StoreServicer`` serves it as
``dispatch.v1.ConversationStore``; ``server.start`` hosts it.
"""
