# Stub for the native module built from dispatcher_rs/ (kept true by mypy.stubtest in `make lint`).
from typing import Final

__all__ = ["__version__"]

__version__: Final[str]
