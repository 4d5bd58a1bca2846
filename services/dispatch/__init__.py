"""Dispatch: an agent runtime served over gRPC.

Subpackages: ``store`` (conversation store), ``exec`` (execution backend),
``kernel`` (turns), ``transport`` (the public API), ``shared`` (what they
share), ``v1`` (generated protobuf code; never edited by hand).
"""

__version__ = "0.1.0"
