"""The polished front end to end on a tiny model: ``run --budget A:B``, ``front``, ``pick``, the hull."""

import json

import optuna
import pytest

from aqsearch.cli import main
from aqsearch.job import JOB_MENU
from aqsearch.storage import load_study

SMALL = ["--eval-tokens", "128", "--seqlen", "32", "--calib-windows", "8", "--calib-seqlen", "32", "--polish-steps", "3",
         "--trials", "40"]


@pytest.fixture(scope="module")
def ran(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("front")
    argv = ["run", "--model", str(tiny_dir), "--budget", "3bpw:5bpw", "--points", "3", "--hull", "menu", *SMALL,
            "--workdir", str(d / "w"), "--json"]
    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue()), d, argv


def test_hull_covers_every_scheme_of_the_menu(ran):
    """Every uniform scheme of the menu is polished and listed (catches a hull that skips schemes)."""
    res, d, _ = ran
    assert {h["scheme"] for h in res["hull"]} == set(JOB_MENU)
    st = load_study(res["storage"], res["study"])
    hull = [t for t in st.trials if t.user_attrs.get("hull")]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["polished"] for t in hull)


def test_front_json_marks_every_point(ran, capsys):
    """``front --json``: each point says ``"polished"``; polished points carry their held-out KL and artifact,
    the others no KL at all (catches a score or prediction reported as quality)."""
    res, d, _ = ran
    capsys.readouterr()
    assert main(["front", "--storage", res["storage"], "--study", res["study"], "--json", "--plot",
                 str(d / "f.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["points"] and all(isinstance(p["polished"], bool) for p in out["points"])
    for p in out["points"]:
        assert (p["kl_mean"] is not None) == p["polished"]
    pol = [p for p in out["points"] if p["polished"]]
    for a in pol:  # the polished points are a front
        assert not any(b["bytes"] <= a["bytes"] and b["kl_mean"] < a["kl_mean"] for b in pol if b is not a)
    assert (d / "f.png").stat().st_size > 1000 and out["hull"]


def test_run_reports_the_polished_uniform_baseline(ran):
    """``run --json``: the baseline is the best *polished* uniform scheme within the budget, and the pick
    is no worse on held-out text (catches a round-to-nearest baseline that flatters the pick)."""
    res, _, _ = ran
    u = res["uniform"]
    assert u["polished"] is True and u["bytes"] <= res["budget_bytes"]
    best = min((h for h in res["hull"] if h["bytes"] <= res["budget_bytes"]), key=lambda h: h["kl_mean"])
    assert u["scheme"] == best["scheme"] and u["kl_mean"] == best["kl_mean"]
    assert res["picked"]["polished"] and res["picked"]["kl_mean"] <= u["kl_mean"]


def test_range_budget_and_rank_correlations_recorded(ran):
    """``--budget A:B --points 3`` gives three budgets; every polished plan after the hull refits the score
    and records its rank correlations (catches correlations never recorded)."""
    res, _, _ = ran
    st = load_study(res["storage"], res["study"])
    assert len(st.user_attrs["aqsearch"]["budgets"]) == 3
    fits = st.user_attrs["score_fits"]
    polished = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(fits) >= len(polished) and fits[-1]["polished"] == len(polished)
    assert {"spearman", "kendall"} <= set(fits[-1]["leave_one_out"]) and "raced_score_vs_kl" in fits[-1]
    assert res["racing"]["promoted"] >= 1 and res["racing"]["steps_if_all_full"] >= res["racing"]["steps"]


def test_pick_returns_the_best_polished_plan_with_no_recompute(ran, tmp_path, capsys, monkeypatch):
    """``pick --budget B``: the least held-out KL among polished plans within B, its artifact copied with its
    checked sha256, no polish and no evaluation run (both made to fail); below every plan: one line, exit 2."""
    import aqsearch.polish
    import aqsearch.quality
    from aqsearch.artifact import Artifact

    res, _, _ = ran
    monkeypatch.setattr(aqsearch.polish, "polish", lambda *a, **k: pytest.fail("pick polished"))
    monkeypatch.setattr(aqsearch.quality, "evaluate", lambda *a, **k: pytest.fail("pick evaluated"))
    pts = [p for p in res["front"] if p["polished"]]
    mid = sorted(pts, key=lambda p: p["bytes"])[len(pts) // 2]
    out = tmp_path / "p.json"
    capsys.readouterr()
    assert main(["pick", "--storage", res["storage"], "--study", res["study"], "--budget", str(mid["bytes"]),
                 "--out", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["bytes"] <= mid["bytes"] and got["polished"] is True
    assert got["kl_mean"] == min(p["kl_mean"] for p in pts if p["bytes"] <= mid["bytes"])
    art = Artifact.load(out)
    assert art.polished or not art.meta["polish"]["kept"]
    assert main(["pick", "--storage", res["storage"], "--study", res["study"], "--budget", "10", "--out",
                 str(tmp_path / "q.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the smallest polished plan" in err[0] and not (tmp_path / "q.json").exists()


def test_a_run_again_polishes_nothing_twice(ran, monkeypatch, capsys):
    """The same command again finds every plan in the study and polishes none of them again (catches a
    resume that repeats the work, or loses the front)."""
    import aqsearch.polish

    res, _, argv = ran
    monkeypatch.setattr(aqsearch.polish, "polish", lambda *a, **k: pytest.fail("polished again"))
    capsys.readouterr()
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert [p["trial"] for p in again["front"]] == [p["trial"] for p in res["front"]]


def test_budget_forms_and_a_study_resumed_with_other_settings(ran, tiny_dir, capsys):
    """``A,B`` is a list and ``A:B`` a range; a front study resumed with another hull is refused in one line
    before any work, with more trials it goes on (catches a study that mixes two settings into one front)."""
    from aqsearch.cli.common import parse_budgets

    assert [b.value for b in parse_budgets("3bpw:5bpw")[0]] == [3.0, 5.0] and parse_budgets("3bpw:5bpw")[1]
    assert len(parse_budgets("3bpw,4bpw,5bpw")[0]) == 3 and not parse_budgets("3bpw,4bpw")[1]
    res, d, argv = ran
    other = [a if a != "menu" else "range" for a in argv]
    capsys.readouterr()
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "other settings (front differ)" in err[-1] and err[-1].startswith("aqsearch: error:")
    assert not any("polish" in line for line in err)
