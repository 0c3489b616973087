"""Answers from recorded runs: groups, ``compare``, ``reproduce``, ``sweep``.

What lives here:

* :mod:`.stats` -- pure functions (mean, std, IQM, seeded bootstrap CIs,
  probability of improvement). Standard library only: numpy is not a
  runtime dependency of ckptd; the tests check these against numpy/scipy.
* :mod:`.compare` -- gathers the sides of ``ckptd compare`` from the store
  (read-only, :class:`ckptd.query.Reader`) and judges them with :mod:`.stats`.
* :mod:`.reproduce` -- reruns a finished run from its recorded provenance in
  a clean checkout of its own and compares the curves value by value.
* :mod:`.sweep` -- expands a sweep into its items, and the daemon side that
  launches them through ``ckptd run`` (the queue itself is in the store).

What it may import: :mod:`ckptd.query` (reads), :mod:`ckptd.store` only
through the daemon (``sweep``'s RPC handlers run in the daemon and write via
``Daemon.call_writer``), ``ckptd_client`` (transport, paths, errors). The CLI
skin is :mod:`ckptd.cli_analysis`; nothing here imports typer.
"""
