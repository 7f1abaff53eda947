"""Summaries of a results file: mean +/- sd per variant, Welch's test, the reference's numbers."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = ["REFERENCE", "summarise", "format_table", "plot_results", "load_results"]

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


def summarise(payload: dict, baseline: str = "standard") -> list[dict]:
    """One row per variant in the file: runs, accuracy mean/sd, parameters, time, Welch vs baseline."""
    by_variant: dict[str, list[dict]] = {}
    for run in payload["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    base = [r["test_acc"] for r in by_variant.get(baseline, [])]
    rows = []
    for variant, runs in by_variant.items():
        accs = [r["test_acc"] for r in runs]
        t, p = (None, None) if variant == baseline else _welch(accs, base)
        rows.append(
            {
                "variant": variant,
                "runs": len(runs),
                "mean_test_acc": statistics.fmean(accs),
                "sd_test_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "sem_test_acc": statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else 0.0,
                "parameters": runs[0]["parameters"],
                "attention_parameters": runs[0]["attention_parameters"],
                "median_train_seconds": statistics.median(r["train_seconds"] for r in runs),
                "mean_best_epoch": statistics.fmean(r["best_epoch"] for r in runs),
                "welch_t_vs_" + baseline: t,
                "welch_p_vs_" + baseline: p,
                **{f"reference_{k}": v for k, v in REFERENCE.get(variant, {}).items()},
            }
        )
    return rows


def format_table(rows: list[dict], baseline: str = "standard") -> str:
    """A plain-text table of :func:`summarise`'s rows."""
    head = f"{'variant':<10} {'n':>2} {'test acc (mean +/- sd)':>22} {'attn params':>11} {'median s':>9} {'p vs ' + baseline:>12} {'reference':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["welch_p_vs_" + baseline]
        ref = r.get("reference_published_mean")
        lines.append(
            f"{r['variant']:<10} {r['runs']:>2} {100 * r['mean_test_acc']:>14.2f} +/- {100 * r['sd_test_acc']:4.2f} "
            f"{r['attention_parameters']:>11,} {r['median_train_seconds']:>9.1f} "
            f"{'' if p is None else f'{p:.3f}':>12} {'' if ref is None else f'{100 * ref:.2f}':>9}"
        )
    return "\n".join(lines)


def plot_results(payload: dict, directory: str | Path, stem: str) -> list[Path]:
    """Validation curves and accuracy against attention parameters, as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = summarise(payload)
    written = []
    fig, (ax_curve, ax_params) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row in rows:
        runs = [r for r in payload["runs"] if r["variant"] == row["variant"]]
        epochs = [h["epoch"] for h in runs[0]["history"]]
        mean_val = [statistics.fmean(r["history"][i]["val_acc"] for r in runs) for i in range(len(epochs))]
        ax_curve.plot(epochs, mean_val, marker="o", label=row["variant"])
        ax_params.errorbar(
            row["attention_parameters"], row["mean_test_acc"], yerr=row["sd_test_acc"], fmt="o", capsize=4, label=row["variant"]
        )
    ax_curve.set(xlabel="epoch", ylabel="validation accuracy (mean over seeds)", title="Training curves")
    ax_params.set(xlabel="attention parameters", ylabel="test accuracy (mean +/- sd)", title="Accuracy vs parameters")
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
