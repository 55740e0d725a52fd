"""SmolLM2-135M, small settings for a 2-core CPU: round-to-nearest trials, a few minutes.

    python studies/smollm2_small.py            # then: aqsearch front --storage sqlite:///studies/smollm2-small.db --study smollm2-small
    optuna-dashboard sqlite:///studies/smollm2-small.db
"""

from pathlib import Path

from aqsearch.models import load_model
from aqsearch.search import SearchSettings, run_study

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
DATA = HERE.parent.parent / "shared" / "data" / "wikitext-2-valid.tokens.txt"  # first half trains, second half scores
BUDGET = "4.5bpw"  # the largest size of interest; every plan under it is on the front
GATES = None  # the search has no gates: it maps the whole trade-off
STORAGE = f"sqlite:///{HERE / 'smollm2-small.db'}"
STUDY = "smollm2-small"
TRIALS = 60
SETTINGS = SearchSettings(granularity="layer", sampler="local", seed=0, eval_tokens=2048, seqlen=256)

if __name__ == "__main__":
    run_study(load_model(MODEL), BUDGET, TRIALS, STORAGE, STUDY, SETTINGS, str(DATA) if DATA.exists() else None)
