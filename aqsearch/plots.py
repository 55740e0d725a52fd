"""The Pareto front as a picture: what ``front --plot`` and the main job write (matplotlib, Agg).

>>> # plot_front("sqlite:///study.db", "demo", "front.png")
"""

from __future__ import annotations

import os

import optuna

from aqsearch.errors import AqError
from aqsearch.strategies.study import pareto_front
from aqsearch.storage import load_study


def check_plot(path: str, force: bool = False) -> None:
    """Before any work: an image format matplotlib writes, a path that takes it (see ``check_output``)."""
    from matplotlib.backend_bases import FigureCanvasBase

    from aqsearch.io import check_output

    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise AqError(f"--plot: cannot write a .{ext} image (use one of {', '.join(sorted(formats))})")
    check_output(path, "--plot", force)


def plot_front(storage: str, study_name: str, path: str) -> None:
    """Front (and every trial, faint) as KL against MiB, warm starts labelled; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aqsearch.io import atomic_path

    study = load_study(storage, study_name)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    front = pareto_front(storage, study_name)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([t.values[1] / 2**20 for t in done], [t.values[0] for t in done], s=8, c="0.75", label="trials")
    ax.plot([p["bytes"] / 2**20 for p in front], [p["kl_mean"] for p in front], "o-", c="C0", ms=4, label="Pareto front")
    for t in done:
        w = t.user_attrs.get("warm_start", "")
        if w.startswith(("uniform", "plan")):
            ax.annotate(w.split()[-1], (t.values[1] / 2**20, t.values[0]), fontsize=6, color="C3")
    limit = study.user_attrs.get("aqsearch", {}).get("budget_bytes")
    if limit:
        ax.axvline(limit / 2**20, ls="--", c="C3", lw=0.8, label="budget")
    ax.set_xlabel("bytes of the governed layers (MiB)")
    ax.set_ylabel("score KL at round-to-nearest (nats/token)")
    ax.set_yscale("log")
    ax.set_title(f"study {study_name}: {len(done)} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
        fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1].lstrip(".").lower() or "png")
    plt.close(fig)

