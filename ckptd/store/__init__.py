"""The store: one SQLite file in WAL mode.

* ``writer``: the schema and its migrations, and ``Store``, the only code that
  writes SQLite (used by the daemon's writer thread alone);
* ``query``: read-only queries for the command line and the views
  (``mode=ro``; never a write, never a daemon);
* ``follow``: ``tail -f`` over ``query``; ``runfilter``: ``ls`` filters.

May import: ``ckptd_client``'s shared modules. Never ``ckptd.daemon`` or ``ckptd.cli``.
"""
