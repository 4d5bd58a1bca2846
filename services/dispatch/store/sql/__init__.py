"""The store logic both SQL backends share (``store``), over each dialect's ``Tx``."""

from dispatch.store.sql.store import UNENDED, RowDict, SQLStore, Tx, run_to_completion

__all__ = ["UNENDED", "RowDict", "SQLStore", "Tx", "run_to_completion"]
