"""``from ckptd_client.lightning import CkptdLogger`` (see ``integrations.lightning``)."""

from .integrations.lightning import CkptdCheckpointIO, CkptdLogger

__all__ = ["CkptdLogger", "CkptdCheckpointIO"]
