"""``from ckptd_client.tensorboard import SummaryWriter`` (see ``integrations.tensorboard``)."""

from .integrations.tensorboard import SummaryWriter

__all__ = ["SummaryWriter"]
