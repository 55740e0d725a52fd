"""SmolLM2-135M, full settings on GPUs: a trained, raced layer bank (one worker process per visible GPU),
then 200 trials with workers sharing a journal-file storage (several processes, one host).

    python studies/smollm2_full.py
    optuna-dashboard journal:///tmp/smollm2-full.journal     # or copy the journal file back first
"""

from pathlib import Path

from aqsearch import BankConfig, DataConfig, Job
from aqsearch.curves import default_regressor
from aqsearch.strategies.study import StudyConfig, run_study

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
DATA = HERE.parent.parent / "shared" / "data" / "wikitext-2-valid.tokens.txt"
BUDGET = "4.5bpw"
STORAGE = "journal:///tmp/smollm2-full.journal"
STUDY = "smollm2-full"
TRIALS = 200
WORKERS = 8

if __name__ == "__main__":
    job = Job.resolve(MODEL, BUDGET, device="cuda",
                      data=DataConfig(calib=str(DATA), calib_windows=128, calib_seqlen=2048, eval_tokens=65536, seqlen=2048),
                      bank=BankConfig(granularity="layer", steps=200))
    bank = job.new_bank(default_regressor())
    bank.build()
    run_study(job, bank, STORAGE, STUDY, TRIALS, StudyConfig(sampler="local"), workers=WORKERS)
