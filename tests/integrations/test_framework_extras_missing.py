"""Without Lightning or transformers installed, importing their integration is
one line naming the ``pip install`` to run, and ``import ckptd_client`` never
needs either."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
sys.modules[{module!r}] = None          # what find_spec sees where it is not installed
import ckptd_client
try:
    import ckptd_client.{name}
except ImportError as exc:
    print(exc)
"""


@pytest.mark.parametrize(("name", "module", "extra"), [
    ("lightning", "lightning", "lightning"),
    ("hf", "transformers", "hf"),
])
def test_missing_framework_names_the_extra(name: str, module: str, extra: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK.format(module=module, name=name)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == (f"ckptd_client needs {module!r} for this integration: "
                                   f"pip install 'ckptd[{extra}]'")


def test_client_import_loads_no_framework() -> None:
    code = ("import sys, ckptd_client, ckptd_client.tensorboard; "
            "print(sorted(m for m in ('lightning', 'transformers', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "[]"
