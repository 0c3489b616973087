"""The daemon: the only writer of the store and of the checkpoint files.

* ``server``: the socket, one reader thread per connection, the writer thread
  (group commits), spool ingestion, clean shutdown;
* ``handlers``: the table of everything else it does, built from the feature
  modules below; reading it tells what the daemon does;
* features (``checkpoints``, ``adopt``, ``dcp_commit``, ``console``,
  ``autoresume``, ``liveness``, ``sysmetrics``, ``control``, ``manage``): each
  receives the ``Daemon`` as its first argument and never imports ``server`` at
  run time (only for type hints);
* helpers shared by server and features: ``validate`` (what a frame may hold),
  ``crashpoints`` (test-only fault injection), ``notify`` (systemd). Which
  checkpoints to keep is ``ckptd.retention``, a public module training scripts
  import too.

May import: ``ckptd_client``'s shared modules (protocol, paths, errors,
identity, spool, checkpoint.format), ``ckptd.store``. Never ``ckptd.cli``.
"""
