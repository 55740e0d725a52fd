"""SmolLM2-135M, small settings for a 2-core CPU: a round-to-nearest bank, round-to-nearest trials, minutes.

    python studies/smollm2_small.py            # then: aqsearch front --storage sqlite:///studies/smollm2-small.db --study smollm2-small
    optuna-dashboard sqlite:///studies/smollm2-small.db
"""

from pathlib import Path

from aqsearch import BankConfig, DataConfig, Job
from aqsearch.strategies.study import StudyConfig, run_study

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
DATA = HERE.parent.parent / "shared" / "data" / "wikitext-2-valid.tokens.txt"  # first half trains, second half scores
BUDGET = "4.5bpw"  # the largest size of interest; every plan under it is on the front
STORAGE = f"sqlite:///{HERE / 'smollm2-small.db'}"
STUDY = "smollm2-small"
TRIALS = 60

if __name__ == "__main__":
    job = Job.resolve(MODEL, BUDGET, data=DataConfig(calib=str(DATA) if DATA.exists() else None, eval_tokens=4096,
                                                     seqlen=256), bank=BankConfig(granularity="layer", steps=0))
    bank = job.new_bank()
    bank.build()
    run_study(job, bank, STORAGE, STUDY, TRIALS, StudyConfig(sampler="local"))
