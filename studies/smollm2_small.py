"""SmolLM2-135M, small settings for a 2-core CPU: the polished front between 2.4 and 4.4 bpw (a round-to-nearest
layer bank, the uniform hull polished, the fitted score, plan racing), about an hour.

    python studies/smollm2_small.py            # then: aqsearch front --storage sqlite:///studies/smollm2-small.db --study smollm2-small
    optuna-dashboard sqlite:///studies/smollm2-small.db
"""

from pathlib import Path

from aqsearch import BankConfig, DataConfig, Job, TrainSettings
from aqsearch.strategies.front import Front, FrontConfig

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
SHARED = HERE.parent.parent / "shared" / "data"
CALIB = SHARED / "wikitext-2-valid.tokens.txt"  # first half trains, second half scores
EVAL = SHARED / "wikitext-2-raw-test.txt"
BUDGETS = ["2.4bpw", "2.8bpw", "3.0bpw", "3.45bpw", "3.8bpw", "4.0bpw", "4.4bpw"]  # the front across them
MENU = ("w8g128", "w4g64", "w4g128", "w3g32", "w3g64", "w3g128", "w2g32", "w2g64", "w2g128")
STORAGE = f"sqlite:///{HERE / 'smollm2-small.db'}"
STUDY = "smollm2-small"

if __name__ == "__main__":
    have = CALIB.exists() and EVAL.exists()
    job = Job.resolve(MODEL, BUDGETS, data=DataConfig(calib=str(CALIB) if have else None, evaluation=str(EVAL) if have else None),
                      bank=BankConfig(menu=MENU, granularity="layer", steps=0), polish=TrainSettings(steps=12, batch=8))
    bank = job.new_bank()
    bank.build()
    Front(job, bank, STORAGE, STUDY, HERE / "smollm2-small-polished", FrontConfig(hull="menu", promote=2)).run()
