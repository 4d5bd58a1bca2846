"""The one store logic over SQL, for every dialect.

Three layers, each looking down only:

- ``store.SQLStore``: every operation of ``backend.Store``, each one transaction of reads
  and writes deciding with ``backend``'s rules, and the migrations runner;
- ``tx.Tx``: every statement those operations send, written once with ``?`` placeholders;
- a dialect (``dispatch.store.sqlite``, ``dispatch.store.postgres``): a ``Tx`` subclass with
  the few primitives in which the databases differ (how a statement runs on its driver, row
  locks, ``RETURNING``, many rows at once, lists as arguments), the connection and its
  transactions, and the schema's DDL.
"""

from dispatch.store.sql.store import Migrations, Schema, SQLStore
from dispatch.store.sql.tx import UNENDED, Tx, insert_sql, run_to_completion

__all__ = ["UNENDED", "Migrations", "SQLStore", "Schema", "Tx", "insert_sql", "run_to_completion"]
