"""``ckptd compare`` and groups: the statistics match an independent computation
(numpy/scipy, here in the test), and the verdict calls a winner only when the
data can tell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import DaemonProc, ckptd, env_for, home_with_runs, run_script

scipy_stats = pytest.importorskip("scipy.stats")

from ckptd.analysis import stats  # noqa: E402

#: Metric values chosen by the test, one list per group (one run per value).
GROUPS = {
    "base": [0.80, 0.81, 0.79, 0.83, 0.78, 0.80],
    "same": [0.80, 0.81, 0.79, 0.83, 0.78, 0.80],  # identical to base: no winner
    "far": [0.90, 0.91, 0.89, 0.93, 0.88, 0.90],  # clearly better
    "one": [0.95],
    "lone": [0.50],
    "two": [0.9, 0.91],
}

MAKE_RUNS = """
import json, sys
import ckptd_client as ckptd
for group, values in json.loads(sys.argv[1]).items():
    for i, v in enumerate(values):
        run = ckptd.init(group=group, config={"lr": group, "seed": i}, seed=i,
                         resume="never")
        run.log({"val/acc": 0.0, "loss": 9.0}, step=0)
        run.log({"val/acc": v, "loss": 1 - v}, step=1)
        run.finish()
"""


@pytest.fixture(scope="module")
def groups_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield home_with_runs(tmp_path_factory.mktemp("cmp"), MAKE_RUNS, args=[json.dumps(GROUPS)])


def compare_json(home: Path, *args: str) -> dict:
    proc = ckptd(home, "compare", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ------------------------------------------------------------ pure statistics

@pytest.mark.parametrize("n", [3, 5, 8, 13])
def test_summary_statistics_match_numpy_and_scipy(n: int) -> None:
    rng = np.random.default_rng(n)
    for trial in range(5):
        xs = rng.normal(loc=trial, scale=0.5 + trial, size=n)
        xs[0] *= 4  # one outlier: IQM and mean must part ways correctly
        values = xs.tolist()
        s = stats.summarize(values)
        assert s["mean"] == pytest.approx(np.mean(xs), rel=1e-12, abs=1e-12)
        assert s["std"] == pytest.approx(np.std(xs, ddof=1), rel=1e-12)
        assert s["median"] == pytest.approx(np.median(xs), rel=1e-12)
        assert s["iqm"] == pytest.approx(scipy_stats.trim_mean(xs, 0.25), rel=1e-12)
        se = np.std(xs, ddof=1) / np.sqrt(n)
        for stat, key in ((np.mean, "ci95"), (lambda a, axis: scipy_stats.trim_mean(
                a, 0.25, axis=axis), "iqm_ci95")):
            ref = scipy_stats.bootstrap((xs,), stat, n_resamples=20000, method="percentile",
                                        confidence_level=0.95, random_state=trial)
            lo, hi = s[key]
            # Monte-Carlo error of a 2.5% quantile from 2000 resamples is ~0.06 se
            assert abs(lo - ref.confidence_interval.low) < 0.3 * se, (key, lo, ref)
            assert abs(hi - ref.confidence_interval.high) < 0.3 * se, (key, hi, ref)


def test_probability_of_improvement_is_mann_whitney_u() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        a = rng.integers(0, 6, size=rng.integers(1, 9)).astype(float)  # ties included
        b = rng.integers(0, 6, size=rng.integers(1, 9)).astype(float)
        u = scipy_stats.mannwhitneyu(a, b, alternative="greater").statistic
        assert stats.prob_better(a.tolist(), b.tolist()) == pytest.approx(u / (len(a) * len(b)))
        u_low = scipy_stats.mannwhitneyu(-a, -b, alternative="greater").statistic
        assert stats.prob_better(a.tolist(), b.tolist(), higher=False) == pytest.approx(
            u_low / (len(a) * len(b)))


def test_bootstrap_is_seeded_and_stated() -> None:
    xs = [0.13, 0.52, 0.21, 0.97, 0.44, 0.71, 0.05, 0.33]
    assert stats.bootstrap_ci(xs) == stats.bootstrap_ci(xs)
    assert stats.bootstrap_ci(xs, seed=1, resamples=200) != stats.bootstrap_ci(
        xs, seed=2, resamples=200)


# ------------------------------------------------------------- the command

def test_compare_reports_what_numpy_computes_from_the_chosen_values(groups_home: Path) -> None:
    out = compare_json(groups_home, "@base", "@far", "--key", "val/acc")
    assert out["resamples"] == 2000 and out["seed"] == 0 and out["higher_is_better"] is True
    for side, name in zip(out["sides"], ("base", "far"), strict=True):
        xs = np.array(GROUPS[name])
        assert side["n"] == len(xs) and len(side["runs"]) == len(xs)
        assert side["mean"] == pytest.approx(xs.mean(), abs=1e-12)
        assert side["std"] == pytest.approx(xs.std(ddof=1), abs=1e-12)
        assert side["iqm"] == pytest.approx(scipy_stats.trim_mean(xs, 0.25), abs=1e-12)
        ref = scipy_stats.bootstrap((xs,), np.mean, n_resamples=20000, method="percentile",
                                    random_state=0).confidence_interval
        se = xs.std(ddof=1) / np.sqrt(len(xs))
        assert abs(side["ci95"][0] - ref.low) < 0.3 * se
        assert abs(side["ci95"][1] - ref.high) < 0.3 * se
    [diff] = out["differences"]
    assert diff["diff"] == pytest.approx(np.mean(GROUPS["base"]) - np.mean(GROUPS["far"]))
    assert diff["p_better"] == 0.0 and diff["ci95"][1] < 0


def test_clearly_separated_groups_name_the_right_winner(groups_home: Path) -> None:
    out = compare_json(groups_home, "@base", "@far", "--key", "val/acc")
    assert out["winner"] == "@far"
    assert [s["verdict"] for s in out["sides"]] == ["worse", "better"]
    # the same runs judged on loss, lower is better: still @far
    out = compare_json(groups_home, "@far", "@base", "--key", "loss", "--lower-is-better")
    assert out["winner"] == "@far" and out["higher_is_better"] is False
    assert out["differences"][0]["p_better"] == 1.0
    # told the wrong direction, the other side wins: the flag is honoured
    out = compare_json(groups_home, "@far", "@base", "--key", "loss", "--higher-is-better")
    assert out["winner"] == "@base"


def test_identical_groups_have_no_winner(groups_home: Path) -> None:
    out = compare_json(groups_home, "@base", "@same", "--key", "val/acc")
    assert out["winner"] is None and out["verdict"].startswith("no winner")
    assert {s["verdict"] for s in out["sides"]} == {"no winner"}
    assert out["differences"][0]["p_better"] == pytest.approx(0.5)
    assert out["config_diff"] == {"lr": {"@base": ["base"], "@same": ["same"]}}


def test_one_run_against_one_run_refuses_to_judge(groups_home: Path) -> None:
    out = compare_json(groups_home, "@one", "@lone", "--key", "val/acc")
    assert out["winner"] is None
    assert "1 seed per side: not enough to tell; run 4 more" == out["verdict"]
    assert [s["n"] for s in out["sides"]] == [1, 1]
    text = ckptd(groups_home, "compare", "@two", "@base", "--key", "val/acc")
    assert text.returncode == 0 and "not enough to tell" in text.stdout
    assert "2 on @two" in text.stdout


def test_sides_can_be_runs_groups_and_filters(groups_home: Path) -> None:
    runs = json.loads(ckptd(groups_home, "ls", "--group", "far", "--json").stdout)
    assert len(runs) == len(GROUPS["far"]) and {r["group"] for r in runs} == {"far"}
    out = compare_json(groups_home, "config.lr=base", runs[0]["id"], "--key", "val/acc",
                       "--at", "step=1")
    assert out["sides"][0]["n"] == len(GROUPS["base"]) and out["sides"][1]["n"] == 1
    out = compare_json(groups_home, "@base", "@far", "--key", "val/acc", "--at", "best")
    assert out["sides"][1]["max"] == max(GROUPS["far"])
    # at step 0 every value is 0.0: no spread, no winner
    out = compare_json(groups_home, "@base", "@far", "--key", "val/acc", "--at", "step=0")
    assert out["winner"] is None


@pytest.mark.parametrize("args, message", [
    (["@nope", "@base", "--key", "val/acc"], "no runs in group 'nope'"),
    (["@base", "@far", "--key", "nokey"], "has no finished run with a nokey value"),
    (["@base", "--key", "val/acc"], "at least two sides"),
    (["@base", "@far", "--key", "val/acc", "--at", "middle"], "use final, best or step=N"),
    (["config.lr", "@far", "--key", "val/acc"], "no run 'config.lr'"),
])
def test_bad_compare_input_is_one_line(groups_home: Path, args: list[str],
                                       message: str) -> None:
    proc = ckptd(groups_home, "compare", *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- groups

def test_run_group_is_recorded_and_wins_over_init_group(home: Path, daemon: DaemonProc,
                                                        tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import ckptd_client as ckptd\n"
                      "run = ckptd.init(group='from-init')\n"
                      "run.log({'x': 1.0}, step=0)\nrun.finish()\n")
    env = env_for(home)
    subprocess.run([sys.executable, "-m", "ckptd", "run", "--group", "from-cli", "--",
                    sys.executable, os.fspath(script)], env=env, check=True, timeout=60,
                   capture_output=True, stdin=subprocess.DEVNULL)
    subprocess.run([sys.executable, os.fspath(script)], env=env, check=True, timeout=60,
                   capture_output=True, stdin=subprocess.DEVNULL)
    runs = json.loads(ckptd(home, "ls", "--json", check=True).stdout)
    assert [r["group"] for r in runs] == ["from-cli", "from-init"]
    assert [r["id"] for r in json.loads(
        ckptd(home, "ls", "--group", "from-init", "--json").stdout)] == [runs[1]["id"]]
    bad = run_script(home, "import ckptd_client as ckptd\nckptd.init(group='')\n",
                     check=False)
    assert bad.returncode != 0 and "group '' must be non-empty" in bad.stderr
