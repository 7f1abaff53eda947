"""Summaries of a results file: mean +/- sd per variant, Welch's test, the reference's numbers."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = ["REFERENCE", "METRICS", "summarise", "format_table", "plot_results", "load_results"]

#: The reference reimplementation's published means (sd) of 5 runs, PyTorch, seed protocol, and
#: its own script rerun on our copy of the data (means only).
REFERENCE: dict[str, dict[str, float]] = {
    "standard": {"published_mean": 0.7285, "published_sd": 0.0063, "rerun_mean": 0.7171},
    "optimised": {"published_mean": 0.7254, "published_sd": 0.0064, "rerun_mean": 0.7139},
    "efficient": {"published_mean": 0.7283, "published_sd": 0.0065, "rerun_mean": 0.7207},
    "super": {"published_mean": 0.7412, "published_sd": 0.0027, "rerun_mean": 0.7343},
}


def _welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | tuple[None, None]:
    if len(a) < 2 or len(b) < 2:
        return None, None
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return None, None
    from scipy.stats import ttest_ind

    t, p = ttest_ind(a, b, equal_var=False)
    return float(t), float(p)


#: How each metric a summary can compare is printed: its label and its factor (accuracy in percent).
METRICS: dict[str, tuple[str, float]] = {
    "test_acc": ("test accuracy", 100.0),
    "test_loss": ("final loss (nats/token)", 1.0),
}


def summarise(payload: dict, baseline: str = "standard", *, metric: str = "test_acc") -> list[dict]:
    """One row per variant in the file: runs, ``metric`` mean/sd/sem, parameters, time, Welch vs baseline.

    The reference reimplementation's published numbers are added to IMDB files only.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    by_variant: dict[str, list[dict]] = {}
    for run in payload["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    base = [r[metric] for r in by_variant.get(baseline, [])]
    imdb = payload.get("experiment", "imdb") == "imdb"
    rows = []
    for variant, runs in by_variant.items():
        values = [r[metric] for r in runs]
        t, p = (None, None) if variant == baseline else _welch(values, base)
        rows.append(
            {
                "variant": variant,
                "runs": len(runs),
                f"mean_{metric}": statistics.fmean(values),
                f"sd_{metric}": statistics.stdev(values) if len(values) > 1 else 0.0,
                f"sem_{metric}": statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0,
                "parameters": runs[0]["parameters"],
                "attention_parameters": runs[0]["attention_parameters"],
                "median_train_seconds": statistics.median(r["train_seconds"] for r in runs),
                "mean_best_epoch": statistics.fmean(r["best_epoch"] for r in runs),
                "welch_t_vs_" + baseline: t,
                "welch_p_vs_" + baseline: p,
                **({f"reference_{k}": v for k, v in REFERENCE.get(variant, {}).items()} if imdb else {}),
            }
        )
    return rows


def format_table(rows: list[dict], baseline: str = "standard", *, metric: str = "test_acc") -> str:
    """A plain-text table of :func:`summarise`'s rows."""
    label, scale = METRICS[metric]
    head = f"{'variant':<10} {'n':>2} {label + ' (mean +/- sd)':>30} {'attn params':>11} {'median s':>9} {'p vs ' + baseline:>12} {'reference':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["welch_p_vs_" + baseline]
        ref = r.get("reference_published_mean")
        lines.append(
            f"{r['variant']:<10} {r['runs']:>2} {scale * r[f'mean_{metric}']:>20.{2 if scale > 1 else 4}f} +/- {scale * r[f'sd_{metric}']:5.{2 if scale > 1 else 4}f} "
            f"{r['attention_parameters']:>11,} {r['median_train_seconds']:>9.1f} "
            f"{'' if p is None else f'{p:.3f}':>12} {'' if ref is None else f'{100 * ref:.2f}':>9}"
        )
    return "\n".join(lines)


def plot_results(payload: dict, directory: str | Path, stem: str, *, metric: str = "test_acc") -> list[Path]:
    """Validation curves and ``metric`` against attention parameters, as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    label, _ = METRICS[metric]
    curve = "val_acc" if metric == "test_acc" else "val_loss"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = summarise(payload, metric=metric)
    written = []
    fig, (ax_curve, ax_params) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row in rows:
        runs = [r for r in payload["runs"] if r["variant"] == row["variant"]]
        epochs = [h["epoch"] for h in runs[0]["history"]]
        mean_val = [statistics.fmean(r["history"][i][curve] for r in runs) for i in range(len(epochs))]
        ax_curve.plot(epochs, mean_val, marker="o", label=row["variant"])
        ax_params.errorbar(
            row["attention_parameters"], row[f"mean_{metric}"], yerr=row[f"sd_{metric}"], fmt="o", capsize=4, label=row["variant"]
        )
    ax_curve.set(xlabel="round" if metric != "test_acc" else "epoch", ylabel=f"{curve.replace('_', ' ')} (mean over seeds)", title="Training curves")
    ax_params.set(xlabel="attention parameters", ylabel=f"{label} (mean +/- sd)", title=f"{label.capitalize()} vs parameters")
    ax_curve.legend()
    ax_params.legend()
    fig.tight_layout()
    for suffix in ("png", "svg"):
        path = directory / f"{stem}.{suffix}"
        fig.savefig(path, dpi=120, metadata={"Date": None} if suffix == "svg" else None)
        written.append(path)
    plt.close(fig)
    return written


#: Where ``results/`` lives on GitHub, for notebooks opened outside a checkout (Colab).
RESULTS_URL = "https://raw.githubusercontent.com/pay-better-attention/pba/main/results/"


def find_results_dir() -> Path | None:
    """The ``results/`` folder of the checkout around the working directory, if there is one."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "results").is_dir() and (folder / "pba").is_dir():
            return folder / "results"
    return None


def load_results(name: str, *, missing_ok: bool = False) -> dict | None:
    """Read ``results/<name>`` from this checkout or, outside one (Colab), from GitHub.

    With ``missing_ok`` a file that does not exist gives ``None`` instead of an error.
    """
    import json
    from urllib.error import HTTPError
    from urllib.request import urlopen

    folder = find_results_dir()
    if folder is not None:
        path = folder / name
        if not path.is_file():
            if missing_ok:
                return None
            raise FileNotFoundError(f"{path} does not exist; the command that makes it is in scripts/")
        return json.loads(path.read_text())
    try:
        with urlopen(RESULTS_URL + name, timeout=30) as response:  # noqa: S310 (a fixed https URL)
            return json.loads(response.read().decode())
    except HTTPError as error:
        if missing_ok and error.code == 404:
            return None
        raise
