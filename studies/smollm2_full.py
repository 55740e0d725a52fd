"""SmolLM2-135M, full settings on a GPU: a round-to-nearest layer bank (one worker process per visible GPU),
the uniform hull polished at 200 steps, the fitted score, and plan racing across 2.2-4.7 bpw.

    python studies/smollm2_full.py
    optuna-dashboard sqlite:///tmp/smollm2-full.db
"""

from pathlib import Path

from aqsearch import BankConfig, DataConfig, Job, TrainSettings
from aqsearch.strategies.front import Front, FrontConfig

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
SHARED = HERE.parent.parent / "shared" / "data"
BUDGETS = ["2.28125bpw", "2.4bpw", "2.5625bpw", "2.8bpw", "3.0bpw", "3.296875bpw", "3.45bpw", "3.59375bpw", "3.8bpw",
           "4.0bpw", "4.3125bpw", "4.7bpw"]
MENU = ("w8g128", "w4g32", "w4g64", "w4g128", "w3g32", "w3g64", "w3g128", "w2g32", "w2g64", "w2g128")
STORAGE = "sqlite:////tmp/smollm2-full.db"
STUDY = "smollm2-full"

if __name__ == "__main__":
    job = Job.resolve(MODEL, BUDGETS, device="cuda",
                      data=DataConfig(calib=str(SHARED / "wikitext-2-valid.tokens.txt"),
                                      evaluation=str(SHARED / "wikitext-2-raw-test.txt"),
                                      calib_windows=128, calib_seqlen=2048, eval_tokens=65536, seqlen=2048),
                      bank=BankConfig(menu=MENU, granularity="layer", steps=0), polish=TrainSettings(steps=200, batch=8))
    bank = job.new_bank()
    bank.build()
    Front(job, bank, STORAGE, STUDY, "/tmp/smollm2-full-polished", FrontConfig(hull="menu", promote=2)).run()
