"""The conversation store: workspaces, conversations, messages, events and turns.

``backend.Store`` is the interface every database backend implements, with the
rules they share; ``sql`` is the one SQL store (every operation, every statement)
over a dialect's ``Tx`` (``sqlite``, ``postgres``); ``service.StoreServicer``
serves a backend as ``dispatch.v1.ConversationStore``; ``server.start`` hosts it.
"""
