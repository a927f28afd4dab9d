"""Figures for predictions, seismic gathers and training curves.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot's global state
(no window, no ``show``), so it works on headless machines with any backend; save it with
``fig.savefig(path)`` or let a notebook display it. matplotlib is imported lazily: the
rest of fwi_core does not need it.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .utils import has_module, optional_import

__all__ = ["plot_predictions", "plot_seismic", "plot_curves", "plot_uncertainty_by_family"]


def _figure(**kwargs):
    return optional_import("matplotlib.figure", "fwi_core.plotting").Figure(**kwargs)


def _maps(x, name: str) -> np.ndarray:
    """Tensor/array of (B,1,H,W), (B,H,W) or (H,W) -> numpy (B,H,W)."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected (B,1,H,W), (B,H,W) or (H,W), got shape {a.shape}")
    return a


def plot_predictions(pred, truth=None, uncertainty=None, titles: Optional[Sequence[str]] = None,
                     vmin: float = 1500.0, vmax: float = 4500.0, max_rows: int = 4):
    """Prediction | truth | absolute error [| uncertainty], one row per sample.

    Args:
        pred, truth: velocity maps (B,1,H,W), (B,H,W) or (H,W), in the units of
            ``vmin``/``vmax`` (m/s by default). Without ``truth`` (test data) only the
            prediction (and uncertainty) columns are drawn.
        uncertainty: optional per-pixel standard deviation (same shape), shown in a
            fourth column.
        titles: optional per-row labels (e.g. sample ids or families).
        max_rows: show at most this many samples.

    Returns:
        A ``matplotlib.figure.Figure``; each row's prediction title carries its MAE.
    """
    p, t = _maps(pred, "pred"), _maps(truth, "truth")
    u = _maps(uncertainty, "uncertainty")
    if t is None:
        t = p
    if p.shape != t.shape or (u is not None and u.shape != p.shape):
        raise ValueError(f"plot_predictions: shapes differ: pred {p.shape}, truth {t.shape}"
                         + ("" if u is None else f", uncertainty {u.shape}"))
    rows = max(1, min(int(max_rows), p.shape[0]))
    has_truth = truth is not None
    cols = (3 if has_truth else 1) + (u is not None)
    fig = _figure(figsize=(3.4 * cols, 3.0 * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    err = np.abs(p - t)
    emax = float(err[:rows].max()) or 1.0
    for r in range(rows):
        label = f"{titles[r]}: " if titles is not None and r < len(titles) else ""
        if has_truth:
            panels = [(p[r], f"{label}prediction (MAE {err[r].mean():.1f})", "viridis", vmin, vmax),
                      (t[r], "truth", "viridis", vmin, vmax),
                      (err[r], "|error|", "magma", 0.0, emax)]
        else:
            panels = [(p[r], f"{label}prediction", "viridis", vmin, vmax)]
        if u is not None:
            panels.append((u[r], "uncertainty", "cividis", 0.0, float(u[:rows].max()) or 1.0))
        for ax, (img, title, cmap, lo, hi) in zip(axes[r], panels):
            im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, shrink=0.85)
    return fig


def plot_seismic(seis, clip_percentile: float = 99.0, title: Optional[str] = None):
    """Shot gathers side by side (time down, receivers across), one panel per source.

    Args:
        seis: (S, T, R) or (1, S, T, R) array/tensor (e.g. (5, 1000, 70)).
        clip_percentile: symmetric colour limit at this percentile of ``|seis|``.
    """
    if hasattr(seis, "detach"):
        seis = seis.detach().cpu().numpy()
    s = np.asarray(seis, dtype=np.float64)
    if s.ndim == 4 and s.shape[0] == 1:
        s = s[0]
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3:
        raise ValueError(f"plot_seismic: expected (S,T,R) or (1,S,T,R), got shape {s.shape}")
    lim = float(np.percentile(np.abs(s), clip_percentile)) or 1.0
    fig = _figure(figsize=(2.2 * s.shape[0] + 1.0, 5.0), layout="constrained")
    axes = np.asarray(fig.subplots(1, s.shape[0], squeeze=False))[0]
    for i, ax in enumerate(axes):
        im = ax.imshow(s[i], cmap="seismic", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_title(f"source {i}", fontsize=9)
        ax.set_xlabel("receiver")
        if i == 0:
            ax.set_ylabel("time sample")
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def _read_history(history) -> List[Dict[str, float]]:
    if isinstance(history, (str, os.PathLike)):
        with open(history, newline="") as f:
            history = list(csv.DictReader(f))
    rows = []
    for rec in history:
        row = {}
        for k, v in dict(rec).items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                continue                          # skip text and empty cells
        rows.append(row)
    return rows


#: columns of a training log that are bookkeeping, not curves
_NOT_CURVES = {"step", "epoch", "lr", "time", "partial", "wall_time"}


def plot_curves(history: Union[str, os.PathLike, Sequence[dict]], x: str = "epoch",
                keys: Optional[Sequence[str]] = None, logy_loss: bool = False):
    """Loss and metric curves from a training history.

    Args:
        history: a list of dicts (one per epoch/step) or a CSV path with a header row.
        x: the column for the horizontal axis (the record index when absent).
        keys: the columns to plot (default: every numeric column but ``x`` and
            bookkeeping columns such as step, lr, time).
        logy_loss: log scale for the loss panel.

    Returns:
        A figure with up to three panels: "loss" (columns whose name contains "loss"),
        "metrics" (the other overall columns) and "per family" (columns named
        ``metric/Family``, e.g. the engine's ``mae_raw/FlatVel_A``; when both raw and EMA
        are logged, the EMA ones are drawn dashed).
    """
    rows = _read_history(history)
    if not rows:
        raise ValueError("plot_curves: the history is empty")
    names = list(keys) if keys is not None else \
        [k for k in dict.fromkeys(k for r in rows for k in r) if k != x and k not in _NOT_CURVES]
    groups = [(title, g) for title, g in (
        ("loss", [k for k in names if "loss" in k.lower()]),
        ("metrics", [k for k in names if "loss" not in k.lower() and "/" not in k]),
        ("per family", [k for k in names if "loss" not in k.lower() and "/" in k])) if g]
    if not groups:
        raise ValueError("plot_curves: no numeric columns to plot")
    fig = _figure(figsize=(5.2 * len(groups), 4.0), layout="constrained")
    axes = np.asarray(fig.subplots(1, len(groups), squeeze=False))[0]
    for ax, (title, group) in zip(axes, groups):
        colors = {}
        for k in group:
            pts = [(r.get(x, i), r[k]) for i, r in enumerate(rows) if k in r]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = {}
            if title == "per family":
                fam = k.split("/", 1)[1]
                if fam in colors:
                    style["color"] = colors[fam]
                style["linestyle"] = "--" if "ema" in k.split("/", 1)[0] else "-"
                label = fam if fam not in colors else None
            else:
                label = k
            line, = ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=label, **style)
            if title == "per family":
                colors.setdefault(k.split("/", 1)[1], line.get_color())
        ax.set_xlabel(x)
        ax.set_title(title + (" (dashed: EMA)" if title == "per family" and
                              any("ema" in k.split("/", 1)[0] for k in group) else ""))
        if title == "loss" and logy_loss:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if title == "per family" else 1)
    return fig


def plot_uncertainty_by_family(uncertainty: Dict[str, Dict[str, object]]):
    """MC-dropout uncertainty of a test run per (predicted) family.

    Args:
        uncertainty: ``RunSummary.uncertainty`` of :mod:`fwi_core.inference_plan`: family ->
            {"files": n, "mean_std": m/s, "depth_std": 70 values (m/s, mean over
            columns and files)}.

    Returns:
        A figure: mean standard deviation per family (bars, labelled with the file
        counts) and the standard deviation against depth per family.
    """
    if not uncertainty:
        raise ValueError("plot_uncertainty_by_family: no uncertainty (MC dropout did not run)")
    fams = sorted(uncertainty)
    fig = _figure(figsize=(11.0, 4.0), layout="constrained")
    ax_bar, ax_depth = fig.subplots(1, 2)
    means = [float(uncertainty[f]["mean_std"]) for f in fams]
    bars = ax_bar.bar(range(len(fams)), means, color="tab:purple")
    for b, f in zip(bars, fams):
        ax_bar.annotate(f"n={uncertainty[f]['files']}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax_bar.set_xticks(range(len(fams)), fams, rotation=45, ha="right", fontsize=8)
    ax_bar.set_ylabel("mean MC-dropout std (m/s)")
    ax_bar.set_title("uncertainty per family")
    for f in fams:
        prof = np.asarray(uncertainty[f]["depth_std"], dtype=np.float64)
        ax_depth.plot(prof, np.arange(len(prof)), label=f)
    ax_depth.invert_yaxis()
    ax_depth.set_xlabel("std (m/s)")
    ax_depth.set_ylabel("depth row")
    ax_depth.set_title("uncertainty against depth")
    ax_depth.grid(alpha=0.3)
    ax_depth.legend(fontsize=7)
    return fig


def show(fig, path: Optional[Union[str, os.PathLike]] = None, dpi: int = 80) -> None:
    """Save ``fig`` to ``path`` (if given) and display it inline in a notebook.

    Figures made here are not attached to pyplot (so nothing opens a window), which also
    means a notebook does not render them by itself: this does.
    """
    if path is not None:
        fig.savefig(path, dpi=dpi)
    if not has_module("IPython"):
        return
    ipython = optional_import("IPython", "inline figures")
    if ipython.get_ipython() is None:
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    display = optional_import("IPython.display", "inline figures")
    display.display(display.Image(data=buf.getvalue()))
