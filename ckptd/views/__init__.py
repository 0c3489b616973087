"""The ways of looking at runs: ``ckptd watch`` (terminal), ``ckptd plot``
(picture files) and ``ckptd ui`` (a local web page).

What may be imported here, and why: the read-only store queries
(:mod:`ckptd.store.query`, which opens the store ``mode=ro``) and the client's
``protocol`` / ``paths`` / ``errors``. Never the daemon or the store writer:
a view must not be able to change what it shows, and a page left open for a
week must not hold the writer's lock. The heavy libraries (Textual,
matplotlib, Starlette) are imported only by the module of the view that
needs them, so ``ckptd ls`` and the client never pay for them.

:mod:`ckptd.views.series` is the one piece of data access the three views
share: SQL-side downsampling (min/max per bucket), attempt/resume markers,
checkpoint dots; it reads metrics only through the store's
``effective_metrics`` view (``Reader.effective_metrics``).
:mod:`ckptd.views.braille` makes the terminal charts of ``watch`` and
``plot`` (plotille, without the numpy import it would pay).
"""
