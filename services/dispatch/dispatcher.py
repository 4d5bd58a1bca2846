"""Facade over the native scheduler module built from ``dispatcher_rs``.

The native module is private; import what it offers from here.
"""

from dispatch import __version__ as _package_version
from dispatch._dispatcher import __version__ as native_version

if native_version != _package_version:  # a stale build of the extension
    raise ImportError(
        f"dispatch._dispatcher is version {native_version} but the package is {_package_version}: "
        "rebuild it with `make install`"
    )

__all__ = ["native_version"]
