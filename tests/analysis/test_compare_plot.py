"""``ckptd compare --plot FILE``: per-seed curves, each side's mean and its 95%
bootstrap band, one colour per side; the band is checked against numpy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import DaemonProc, ckptd, run_script

#: Seeds per side and the curve each seed logs: side offset + seed wobble.
SEEDS = {"low": [0.0, 0.05, -0.04], "high": [1.0, 1.06, 0.97, 1.02]}
STEPS = 12

MAKE_RUNS = """
import json, sys
import ckptd_client as ckptd
for group, wobbles in json.loads(sys.argv[1]).items():
    for i, w in enumerate(wobbles):
        run = ckptd.init(group=group, config={"seed": i}, seed=i, resume="never")
        for step in range(int(sys.argv[2])):
            run.log({"val/acc": w + step * 0.1}, step=step)
        run.finish()
"""


@pytest.fixture(scope="module")
def plot_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("cmpplot") / "home"
    home.mkdir(mode=0o700)
    d = DaemonProc(home)
    d.start()
    try:
        run_script(home, MAKE_RUNS, args=[json.dumps(SEEDS), str(STEPS)])
        yield home
    finally:
        d.stop()


def test_svg_has_one_line_per_seed_and_one_mean_and_band_per_side(plot_home: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "cmp.svg"
    proc = ckptd(plot_home, "compare", "@low", "@high", "--key", "val/acc", "--plot",
                 str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"plot: {out}" in proc.stdout
    svg = out.read_text()
    ids = re.findall(r'<g id="((?:seed|mean|band)-[^"]+)"', svg)
    seeds = [i for i in ids if i.startswith("seed-")]
    assert len([i for i in seeds if i.startswith("seed-0-")]) == len(SEEDS["low"])
    assert len([i for i in seeds if i.startswith("seed-1-")]) == len(SEEDS["high"])
    assert sorted(i for i in ids if i.startswith("mean-")) == ["mean-0", "mean-1"]
    assert sorted(i for i in ids if i.startswith("band-")) == ["band-0", "band-1"]
    # each seed group holds one drawn path; the mean of a side is one path too
    for gid in seeds + ["mean-0", "mean-1"]:
        body = svg.split(f'<g id="{gid}">', 1)[1].split("</g>", 1)[0]
        assert body.count("<path") == 1, gid
    assert "95% bootstrap interval of the mean" in svg


def test_png_shows_both_side_colours(plot_home: Path, tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "cmp.png"
    ckptd(plot_home, "compare", "@low", "@high", "--key", "val/acc", "--plot", str(out),
          "--json", check=True)
    assert out.stat().st_size > 5000
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (520, 900)
    rgb = (img[..., :3] * 255).round().astype(int)
    for hexcolor in ("#1f77b4", "#ff7f0e"):  # C0 and C1: the two sides' mean lines
        want = np.array([int(hexcolor[k:k + 2], 16) for k in (1, 3, 5)])
        hits = np.all(np.abs(rgb - want) <= 2, axis=-1).sum()
        assert hits > 200, (hexcolor, hits)


def test_band_is_the_bootstrap_interval_of_the_mean_across_seeds() -> None:
    from ckptd.analysis.compare_plot import mean_band

    rng = np.random.default_rng(3)
    curves = [{"run": str(i), "step": list(range(10)),
               "value": (rng.normal(size=10) + i).tolist()} for i in range(5)]
    steps, mean, low, high = mean_band(curves, resamples=4000, seed=1)
    table = np.array([c["value"] for c in curves])
    assert steps == list(range(10))
    assert np.allclose(mean, table.mean(axis=0))
    # independent bootstrap: same statistic, another generator
    other = np.random.default_rng(99).integers(0, 5, size=(4000, 5))
    ref_low, ref_high = np.percentile(table[other].mean(axis=1), [2.5, 97.5], axis=0)
    width = ref_high - ref_low
    assert np.all(np.abs(np.array(low) - ref_low) < 0.1 * width)
    assert np.all(np.abs(np.array(high) - ref_high) < 0.1 * width)
    assert np.all(np.array(low) <= mean) and np.all(mean <= np.array(high))


def test_plot_only_over_steps_every_seed_reached() -> None:
    from ckptd.analysis.compare_plot import mean_band

    curves = [{"run": "a", "step": [0, 1, 2, 3], "value": [0, 1, 2, 3]},
              {"run": "b", "step": [0, 1, 2], "value": [1, 2, 3]}]
    steps, mean, _, _ = mean_band(curves, resamples=200, seed=0)
    assert steps == [0, 1, 2] and mean == [0.5, 1.5, 2.5]


def test_unknown_picture_format_is_one_line(plot_home: Path, tmp_path: Path) -> None:
    proc = ckptd(plot_home, "compare", "@low", "@high", "--key", "val/acc", "--plot",
                 str(tmp_path / "x.gif"))
    assert proc.returncode != 0
    assert "use .png or .svg" in proc.stderr and "Traceback" not in proc.stderr
