# Stub for the native module built from dispatcher_rs/ (kept true by mypy.stubtest).
from typing import Final

__version__: Final[str]
