"""``from ckptd_client.hf import CkptdCallback`` (see ``integrations.hf``)."""

from .integrations.hf import CkptdCallback

__all__ = ["CkptdCallback"]
