"""SmolLM2-135M, full settings for one H200: 200 trials with unit training and learning-curve pruning,
eight workers on one GPU sharing a journal-file storage (several processes, one host).

    python studies/smollm2_full.py
    optuna-dashboard journal:///tmp/smollm2-full.journal     # or copy the journal file back first
"""

import sys
from pathlib import Path

from aqsearch.curves import default_regressor
from aqsearch.models import load_model
from aqsearch.search import SearchSettings, run_study

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
DATA = HERE.parent.parent / "shared" / "data" / "wikitext-2-valid.tokens.txt"
BUDGET = "4.5bpw"
STORAGE = "journal:///tmp/smollm2-full.journal"
STUDY = "smollm2-full"
TRIALS = 200
WORKERS = 8
SETTINGS = SearchSettings(granularity="layer", sampler="local", seed=0, eval_tokens=32768, seqlen=2048,
                          calib_windows=32, calib_seqlen=256, train=True, steps=40, prune=True)

if __name__ == "__main__":
    argv = ["search", "--model", MODEL, "--device", "cuda", "--storage", STORAGE, "--study", STUDY, "--budget", BUDGET,
            "--trials", str(TRIALS), "--calib-data", str(DATA), "--eval-tokens", "32768", "--seqlen", "2048",
            "--calib-samples", "32", "--calib-seqlen", "256", "--train", "--steps", "40"]
    run_study(load_model(MODEL, device="cuda"), BUDGET, TRIALS, STORAGE, STUDY, SETTINGS, str(DATA), "cuda",
              workers=WORKERS, argv=argv, regressor=default_regressor())
    sys.exit(0)
