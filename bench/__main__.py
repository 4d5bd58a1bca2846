"""``python -m bench``: run every benchmark (today: the tool-dispatch scheduler)."""

from __future__ import annotations

import sys

from bench import dispatcher

if __name__ == "__main__":
    sys.exit(dispatcher.main(sys.argv[1:]))
