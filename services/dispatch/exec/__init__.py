"""The exec service: the small, safe surface of primitives tools are written against.

``backend`` defines what a computer can do (spawn, read, write, stat, list);
``local`` does it on this machine; ``computers`` maps a ``computer_id`` to its
backend; ``service`` is the thin gRPC servicer over all of them.
"""
