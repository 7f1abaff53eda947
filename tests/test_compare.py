"""pba.experiments.compare: the book's one rule for comparing a variant with the baseline."""

from __future__ import annotations

import pytest
from scipy import stats

from pba.experiments import compare, compare_means


def payload(values: dict[str, list[float]], metric: str = "test_acc") -> dict:
    return {"runs": [{"variant": v, metric: x} for v, xs in values.items() for x in xs]}


def test_matches_welch_from_scipy() -> None:
    ours, theirs = [0.74, 0.75, 0.73, 0.76, 0.745], [0.72, 0.73, 0.725, 0.715, 0.74]
    result = compare(payload({"super": ours, "standard": theirs}), "super")
    welch = stats.ttest_ind(ours, theirs, equal_var=False)
    assert result.p_value == pytest.approx(welch.pvalue, rel=1e-9)
    interval = welch.confidence_interval(0.95)
    assert (result.low, result.high) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert result.difference == pytest.approx(0.745 - 0.726) and result.verdict == "better" and result.runs == (5, 5)


def test_direction_of_better_follows_the_metric() -> None:
    lower = {"super": [1.80, 1.81, 1.79], "standard": [1.90, 1.91, 1.89]}
    assert compare(payload(lower, "test_loss"), "super", metric="test_loss").verdict == "better"
    assert compare(payload(lower), "super").verdict == "worse"  # as accuracies, lower is worse


def test_overlap_is_no_detectable_difference_and_a_wider_interval_than_two_se() -> None:
    result = compare(payload({"efficient": [0.70, 0.74, 0.72], "standard": [0.71, 0.73, 0.70]}), "efficient")
    assert result.verdict == "no detectable difference" and result.low < 0 < result.high
    assert result.high - result.difference > 2 * result.standard_error  # the t quantile, not 2


def test_baseline_from_another_file_and_errors() -> None:
    other = payload({"standard": [1.9, 1.91]}, "test_loss")
    result = compare(payload({"super": [1.80, 1.82]}, "test_loss"), "super", metric="test_loss", baseline_payload=other)
    assert result.verdict == "better"
    with pytest.raises(ValueError, match="standard needs at least 2 runs to compare, got 1"):
        compare(payload({"super": [0.7, 0.71], "standard": [0.7]}), "super")
    with pytest.raises(ValueError, match="metric must be one of"):
        compare(payload({"super": [0.7, 0.71]}), "super", metric="val_bpc")


def test_compare_means_from_summaries_equals_welch_on_the_runs() -> None:
    import statistics

    ours, theirs = [0.74, 0.75, 0.73, 0.76, 0.745], [0.72, 0.73, 0.725, 0.715, 0.74]
    summary = compare_means(
        (statistics.fmean(ours), statistics.stdev(ours), 5), (statistics.fmean(theirs), statistics.stdev(theirs), 5),
        variant="super", baseline="published",
    )
    interval = stats.ttest_ind(ours, theirs, equal_var=False).confidence_interval(0.95)
    assert (summary.low, summary.high) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert summary.baseline == "published" and summary.verdict == "better"
    with pytest.raises(ValueError, match="ours must hold at least 2 runs, got 1"):
        compare_means((0.7, 0.01, 1), (0.7, 0.01, 5), variant="a", baseline="b")
    with pytest.raises(ValueError, match="theirs's standard deviation must be >= 0"):
        compare_means((0.7, 0.01, 5), (0.7, -1.0, 5), variant="a", baseline="b")
