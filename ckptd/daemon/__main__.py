"""``python -m ckptd.daemon``: what auto-start and the tests run (``ckptd daemon`` is the same)."""

import sys

from ckptd.daemon.server import main

sys.exit(main())
