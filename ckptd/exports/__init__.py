"""Getting data out of ckptd in standard formats (``ckptd export``, ``ckpt export``).

Optional libraries (tensorboard, pyarrow, safetensors) are imported only by
the format that needs them; a missing one is one line naming the install.
"""

from __future__ import annotations

import importlib
from typing import Any

from ckptd_client.errors import CkptdError


class MissingExtra(CkptdError):
    """An export format needs a library that is not installed."""


def need(module: str, what: str) -> Any:
    """Import ``module`` or raise :class:`MissingExtra` naming ``pip install 'ckptd[export]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs the {module.split('.')[0]!r} package: "
                           "pip install 'ckptd[export]'") from None
