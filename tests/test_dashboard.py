"""optuna-dashboard shows a study: started on a loopback port, opened in headless Chromium."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def dashboard(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{d}/dash.db"
    from aqsearch.bank import BankConfig
    from aqsearch.job import DataConfig, Job
    from aqsearch.strategies.front import Front, FrontConfig
    from aqsearch.training import TrainSettings

    # a front with its hull, a plan the racing stops (a regressor stub predicts it beaten) and one it polishes
    job = Job.resolve(str(tiny_dir), ["3bpw", "6bpw"], data=DataConfig(calib_windows=4, calib_seqlen=32, eval_tokens=64, seqlen=32),
                      bank=BankConfig(menu=("w8g128", "w4g64", "w2g64"), granularity="layer", steps=0),
                      polish=TrainSettings(steps=2, batch=4))
    bank = job.new_bank()
    bank.build()
    f = Front(job, bank, url, "tiny-front", d, FrontConfig(hull="menu"))
    f.hull()
    f._refit = lambda: None
    f.reg = type("Stub", (), {"predict": lambda self, r: {"lo": 1e3, "mid": 1e3, "hi": 1e3, "n": 0, "rung": "0"}})()
    f._run({u.name: ("w4g64" if i % 2 else "w2g64") for i, u in enumerate(bank.units)}, "mixed", {}, race=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("optuna-dashboard")
    p = subprocess.Popen([str(exe), url, "--host", "127.0.0.1", "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "/api/studies", timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    yield base
    p.terminate()
    p.wait()


def test_dashboard_api_sees_study_and_metric_names(dashboard):
    import json

    studies = json.loads(urllib.request.urlopen(dashboard + "/api/studies").read())["study_summaries"]
    s = [x for x in studies if x["study_name"] == "tiny-front"][0]
    detail = json.loads(urllib.request.urlopen(f"{dashboard}/api/studies/{s['study_id']}?after=0").read())
    assert detail["objective_names"] == ["held-out KL after the polish (nats/token)", "bytes"]
    trials = detail["trials"]
    assert len(trials) == 4 and all(t["constraints"] for t in trials)
    attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in trials]
    assert [t["state"] for t in trials] == ["Complete"] * 3 + ["Pruned"]
    assert "uniform w2g64" in attrs[-1]["stopped_because"] and str(attrs[-1]["polished"]).lower() == "false"
    assert all(str(a["polished"]).lower() == "true" and "artifact" in a for a in attrs[:3])


def test_pareto_front_renders_in_chromium(dashboard):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(dashboard + "/dashboard")
        page.get_by_text("tiny-front").first.wait_for(timeout=30000)
        page.get_by_text("tiny-front").first.click()
        page.get_by_text("Pareto Front").first.wait_for(timeout=30000)
        page.wait_for_selector(".js-plotly-plot .scatterlayer .point", timeout=30000)
        points = page.locator(".js-plotly-plot .scatterlayer .point").count()
        page.screenshot(path=str(ARTIFACTS / "dashboard-pareto.png"), full_page=True)
        browser.close()
    assert points >= 3
