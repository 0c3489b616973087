"""Checkpoints, in three modules with one job each.

* ``format``: the on-disk layout, manifest, hashing and reading; shared with the
  daemon, which imports only this module of the client's checkpoint code;
* ``snapshot``: the trainer side of ``run.checkpoint()`` (imports ``format``);
* ``restore``: ``run.restore()`` (imports ``format``).
"""
