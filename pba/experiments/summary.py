"""Summaries of a results file: mean +/- sd per variant, Welch's test, the reference's numbers."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__

__all__ = ["REFERENCE", "METRICS", "Comparison", "compare", "compare_means", "summarise", "format_table", "plot_results", "load_results", "read_results"]

#: The reference reimplementation's published means (sd) of 5 runs, PyTorch, seed protocol, and
#: its own script rerun on our copy of the data (means only). The reference does not say whether
#: its sds divide by n or n - 1; :func:`compare_means` takes them as sample sds (n - 1).
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


@dataclass(frozen=True)
class Comparison:
    """One variant against a baseline on one metric: :func:`compare`'s answer."""

    variant: str
    baseline: str
    metric: str
    runs: tuple[int, int]  # (variant, baseline)
    difference: float  # mean(variant) - mean(baseline)
    standard_error: float  # of the difference
    low: float  # 95 % confidence interval of the difference (Welch)
    high: float
    p_value: float  # Welch's two-sided t-test
    verdict: str  # "better", "worse" or "no detectable difference"


def compare(
    payload: dict,
    variant: str,
    baseline: str = "standard",
    *,
    metric: str = "test_acc",
    baseline_payload: dict | None = None,
) -> Comparison:
    """The book's one rule for "is this variant different from the baseline?".

    Runs are independent seeds. The difference of the means gets Welch's 95 % confidence interval
    (unequal variances, Welch-Satterthwaite degrees of freedom, the t quantile rather than 2: with
    3 to 5 seeds a "2 standard errors" rule would be a test at 8 to 18 %, not 5 %). The variant is
    ``better`` or ``worse`` when the interval excludes zero (``test_loss``: lower is better), else
    there is ``no detectable difference``, which is not evidence of equality: the interval says how
    large a difference the runs cannot exclude. ``baseline_payload``: take the baseline's runs from
    another file (a variant rerun with one option changed).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    ours = [r[metric] for r in payload["runs"] if r["variant"] == variant]
    theirs = [r[metric] for r in (baseline_payload or payload)["runs"] if r["variant"] == baseline]
    for name, values in ((variant, ours), (baseline, theirs)):
        if len(values) < 2:
            raise ValueError(f"{name} needs at least 2 runs to compare, got {len(values)}")
    return compare_means(
        (statistics.fmean(ours), statistics.stdev(ours), len(ours)),
        (statistics.fmean(theirs), statistics.stdev(theirs), len(theirs)),
        variant=variant, baseline=baseline, metric=metric,
    )


def compare_means(
    ours: tuple[float, float, int],
    theirs: tuple[float, float, int],
    *,
    variant: str,
    baseline: str,
    metric: str = "test_acc",
) -> Comparison:
    """:func:`compare` from summaries, ``(mean, sample sd, runs)`` each: for a published table
    that gives only those (the reference's means and sds of 5 runs, :data:`REFERENCE`)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    for name, (_, sd, n) in (("ours", ours), ("theirs", theirs)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"{name} must hold at least 2 runs, got {n!r}")
        if not sd >= 0:
            raise ValueError(f"{name}'s standard deviation must be >= 0, got {sd!r}")
    from scipy import stats

    (mean_ours, sd_ours, n_ours), (mean_theirs, sd_theirs, n_theirs) = ours, theirs
    var_ours, var_theirs = sd_ours**2 / n_ours, sd_theirs**2 / n_theirs
    se = (var_ours + var_theirs) ** 0.5
    difference = mean_ours - mean_theirs
    if se == 0:
        low = high = difference
        p = 1.0 if difference == 0 else 0.0
    else:
        dof = se**4 / (var_ours**2 / (n_ours - 1) + var_theirs**2 / (n_theirs - 1))
        half = float(stats.t.ppf(0.975, dof)) * se
        low, high = difference - half, difference + half
        p = float(2 * stats.t.sf(abs(difference) / se, dof))
    sign = -1.0 if metric == "test_loss" else 1.0  # which direction is "better"
    if low > 0 or high < 0:
        verdict = "better" if sign * difference > 0 else "worse"
    else:
        verdict = "no detectable difference"
    return Comparison(variant, baseline, metric, (n_ours, n_theirs), difference, se, low, high, p, verdict)


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


#: Where ``results/`` lives on GitHub for this version (its tag), for notebooks opened outside a
#: checkout (Colab): the results that went with the code that reads them.
RESULTS_URL = f"https://raw.githubusercontent.com/pay-better-attention/pba/v{__version__}/results/"


def find_results_dir() -> Path | None:
    """``$PBA_RESULTS_DIR`` if set, else the ``results/`` folder of the checkout around the working
    directory, if there is one (else :func:`load_results` reads :data:`RESULTS_URL`)."""
    named = os.environ.get("PBA_RESULTS_DIR")
    if named:
        if not Path(named).is_dir():
            raise FileNotFoundError(f"PBA_RESULTS_DIR={named!r} is not a directory")
        return Path(named)
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "results").is_dir() and (folder / "pba").is_dir():
            return folder / "results"
    return None


def read_results(name: str, *, missing_ok: bool = False) -> str | None:
    """The text of ``results/<name>``, from this checkout or, outside one (Colab), from GitHub.

    With ``missing_ok`` a file that does not exist gives ``None`` instead of an error.
    """
    from urllib.error import HTTPError
    from urllib.request import urlopen

    folder = find_results_dir()
    if folder is not None:
        path = folder / name
        if not path.is_file():
            if missing_ok:
                return None
            raise FileNotFoundError(f"{path} does not exist; the command that makes it is in scripts/")
        return path.read_text()
    try:
        with urlopen(RESULTS_URL + name, timeout=30) as response:  # noqa: S310 (a fixed https URL)
            return response.read().decode()
    except HTTPError as error:
        if missing_ok and error.code == 404:
            return None
        raise


def load_results(name: str, *, missing_ok: bool = False) -> dict | None:
    """:func:`read_results`, parsed as JSON (a results file or ``None``)."""
    import json

    text = read_results(name, missing_ok=missing_ok)
    return None if text is None else json.loads(text)
