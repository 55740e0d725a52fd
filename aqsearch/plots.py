"""The Pareto front as a picture: what ``front --plot`` and the main job write (matplotlib, Agg).

>>> # plot_front("sqlite:///study.db", "demo", "front.png")
"""

from __future__ import annotations

import os

import optuna

from aqsearch.errors import AqError
from aqsearch.strategies.front import points_of, front_study, hull_of, lower_hull, staircase


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
    """The polished front over the uniform staircase and hull, as held-out KL against MiB; plans the
    racing stopped drawn at their predicted KL (hollow, labelled as predictions); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aqsearch.io import atomic_path

    study = front_study(storage, study_name)
    pts = points_of(study)
    hull = hull_of(study)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    mib = 2.0**20
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([t.values[1] / mib for t in done], [t.values[0] for t in done], s=10, c="0.7", label="polished plans")
    if hull:
        ax.step([h[1] / mib for h in hull], [staircase(hull, h[1]) for h in hull], where="post",
                c="C3", lw=1, label="uniform staircase")
        lh = lower_hull(hull)
        ax.plot([h[1] / mib for h in lh], [h[0] for h in lh], "--", c="C3", lw=0.8, label="uniform hull")
        for kl, b, s in hull:
            ax.annotate(s, (b / mib, kl), fontsize=6, color="C3")
    pol = [p for p in pts if p["polished"]]
    ax.plot([p["bytes"] / mib for p in pol], [p["kl_mean"] for p in pol], "o-", c="C0", ms=4, label="polished front")
    stop = [p for p in pts if not p["polished"] and p.get("predicted_kl")]
    if stop:
        ax.scatter([p["bytes"] / mib for p in stop], [p["predicted_kl"]["mid"] for p in stop], s=14, facecolors="none",
                   edgecolors="C1", label="stopped by racing (predicted, not measured)")
    limit = study.user_attrs.get("aqsearch", {}).get("budget_bytes")
    if limit:
        ax.axvline(limit / mib, ls=":", c="k", lw=0.8, label="largest budget")
    ax.set_xlabel("bytes of the governed layers (MiB)")
    ax.set_ylabel("held-out KL after the polish (nats/token)")
    ax.set_yscale("log")
    ax.set_title(f"study {study_name}: {len(done)} polished plans")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
        fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1].lstrip(".").lower() or "png")
    plt.close(fig)
