"""``ckptd plot``: picture files whose pixels and paths follow the data."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from helpers import ckptd, run_script

RUN = """
import ckptd_client as ckptd
run = ckptd.init(name="{name}")
for s in range(300):
    run.log({{"loss": {expr}}}, step=s)
    if s == 150:
        run.checkpoint({{"s": s}}, step=s).wait(timeout=60)
run.finish(timeout=30)
print(run.id)
"""


def make(home: Path, name: str, expr: str) -> str:
    return run_script(home, RUN.format(name=name, expr=expr)).stdout.split()[-1]


def test_png_has_the_size_and_its_curve_follows_the_data(home: Path, daemon: object,
                                                         tmp_path: Path) -> None:
    # loss = s**2: rising, faster and faster
    rid = make(home, "up", "float(s * s)")
    out = tmp_path / "up.png"
    proc = ckptd(home, "plot", rid, "--key", "loss", "-o", str(out), "--size", "800x500")
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[:2] == (500, 800)
    rgb = (img[:, :, :3] * 255).round().astype(int)
    c0 = np.array([31, 119, 180])  # matplotlib's first colour: the line
    line = (np.abs(rgb - c0).sum(axis=2) < 40)
    cols = [c for c in range(800) if line[:, c].any()]
    assert len(cols) > 400
    top = np.array([np.argmax(line[:, c]) for c in cols])  # highest line pixel per column
    # the curve rises left to right: rows (counted from the top) only go up
    assert (np.diff(top) <= 1).mean() > 0.97
    assert top[0] - top[-1] > 250
    # and it is convex like s**2: at the middle column it is below the chord
    mid = len(cols) // 2
    assert top[mid] > (top[0] + top[-1]) / 2 + 40


def test_svg_has_one_path_per_run(home: Path, daemon: object, tmp_path: Path) -> None:
    a = make(home, "a", "1.0 / (s + 1)")
    b = make(home, "b", "2.0 / (s + 1)")
    out = tmp_path / "two.svg"
    proc = ckptd(home, "plot", a, b, "--key", "loss", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    ns = "{http://www.w3.org/2000/svg}"
    root = ET.parse(out).getroot()
    groups = {g.get("id"): g for g in root.iter(f"{ns}g") if (g.get("id") or "")
              .startswith("run-")}
    assert set(groups) == {f"run-{a}-loss", f"run-{b}-loss"}
    for g in groups.values():
        assert len(list(g.iter(f"{ns}path"))) == 1
    # checkpoint dots are drawn too, one group per run
    assert sum(1 for g in root.iter(f"{ns}g") if (g.get("id") or "").startswith("ckpt-")) == 2


def test_terminal_plot_and_errors(home: Path, daemon: object, tmp_path: Path) -> None:
    rid = make(home, "t", "float(s)")
    proc = ckptd(home, "plot", rid, "--key", "loss")
    assert proc.returncode == 0, proc.stderr
    assert sum("\u2801" <= ch <= "\u28ff" for ch in proc.stdout) > 30
    bad = ckptd(home, "plot", rid, "--key", "nope", "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "no metric 'nope'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = ckptd(home, "plot", rid, "--key", "loss", "-o", str(tmp_path / "x.gif"))
    assert bad.returncode != 0 and ".png, .svg or .html" in bad.stderr
    assert not (tmp_path / "x.png").exists()
