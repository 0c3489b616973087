"""Running a training command under ckptd: ``ckptd run`` (``supervisor``),
``ckptd resume`` (``resume``) and the systemd unit that brings the daemon back
at boot (``service``), with the transient scope each relaunch of the daemon's
runs in there (``scope``).

May import: ``ckptd_client`` (a supervisor is a client of its own run),
``ckptd.store`` (read-only queries). The daemon starts supervisors as
processes, it does not import them.
"""
