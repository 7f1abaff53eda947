"""pba.benchmark on a tiny shape: every contender timed, ratios and the MAC model reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pba.benchmark import CONTENDERS, bench_shape
from pba.experiments.summary import load_results, read_results


def test_bench_shape_reports_every_contender() -> None:
    row = bench_shape(8, 16, n_heads=2, repeats=2, warmup=1)
    median = row["median_seconds"]
    assert set(median) == set(CONTENDERS)
    assert all(t["forward"] > 0 and t["forward_backward"] > 0 for t in median.values())
    for name in CONTENDERS:  # each ratio is that contender's median over standard's, per mode
        assert row["ratio_to_standard"][name] == pytest.approx(median[name]["forward_backward"] / median["standard"]["forward_backward"])
        assert row["forward_ratio_to_standard"][name] == pytest.approx(median[name]["forward"] / median["standard"]["forward"])
    # l = 8, d = 16: standard 4*8*256 + 2*64*16 = 10,240 MACs; optimised 8,192; efficient 6,144;
    # super 2*8*256 + 3*64*16 = 7,168 (PAPER.md's table, by hand); torch's layer counts as standard.
    expected = {"torch_mha": 1.0, "standard": 1.0, "optimised": 0.8, "efficient": 0.6, "super": 0.7}
    assert row["mac_ratio"] == pytest.approx(expected)
    assert row["batch"] == 1024  # 8,192 tokens of length 8
    assert set(row["peak_memory_mib"]) == set(CONTENDERS)


def test_bench_shape_can_leave_memory_to_another_process() -> None:
    row = bench_shape(8, 16, n_heads=2, repeats=1, warmup=0, memory=False)
    assert row["peak_memory_mib"] == dict.fromkeys(CONTENDERS)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc high-water mark")
def test_script_times_here_and_measures_memory_in_a_child(tmp_path: Path) -> None:
    """The CPU script end to end: times in this process, memory from its MALLOC_MMAP_THRESHOLD_ child."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "attention_speed.py"
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--max-length", "128", "--repeats", "1", "--warmup", "0", "--out", str(out)],
        check=True, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"},
    )
    payload = json.loads(out.read_text())
    assert payload["command"].endswith("--out " + str(out))
    rows = {(r["length"], r["d_model"]): r for r in payload["rows"]}
    assert set(rows) == {(32, 64), (128, 256), (128, 512)}
    peak = rows[(128, 512)]["peak_memory_mib"]  # fewer projections keep fewer activations
    assert peak["efficient"] < peak["optimised"] < peak["standard"] < peak["torch_mha"]
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_load_results_reads_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps({"runs": [1]}))
    (tmp_path / "pba").mkdir()
    (tmp_path / "book").mkdir()
    monkeypatch.chdir(tmp_path / "book")
    assert load_results("x.json") == {"runs": [1]}
    assert load_results("absent.json", missing_ok=True) is None
    with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
        load_results("absent.json")
    (tmp_path / "results" / "log.txt").write_text("command: x\nline\n")
    assert read_results("log.txt") == "command: x\nline\n" and read_results("absent.txt", missing_ok=True) is None


def test_committed_results_name_their_command() -> None:
    results = Path(__file__).resolve().parent.parent / "results"
    files = sorted(results.rglob("*.json"))
    assert files, "no committed results"
    for path in files:
        payload = json.loads(path.read_text())
        assert payload.get("command", "").startswith("python "), path.name
        assert os.stat(path).st_mode & 0o044, f"{path.name} is not readable by others"


def test_speedup_interval_is_the_t_interval_of_the_log_ratios() -> None:
    import math

    from scipy import stats

    from pba.benchmark import speedup_interval

    plain = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03]
    ours = [1.05, 1.06, 1.02, 1.04, 1.05, 1.07]
    logs = [math.log(p / o) for p, o in zip(plain, ours)]
    interval = stats.ttest_1samp(logs, 0.0).confidence_interval(0.95)
    estimate, low, high, verdict = speedup_interval(plain, ours)
    assert (low, high) == pytest.approx((math.exp(interval.low), math.exp(interval.high)), rel=1e-12)
    assert estimate == pytest.approx(math.exp(sum(logs) / len(logs)), rel=1e-12) and low < estimate < high
    assert verdict == "slower" and high < 1
    assert speedup_interval(ours, plain)[3] == "faster"
    assert speedup_interval([1.0, 1.1, 0.9], [1.0, 0.9, 1.1])[3] == "no detectable difference"
    with pytest.raises(ValueError, match="at least 2 rounds"):
        speedup_interval([1.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        speedup_interval([1.0, 0.0], [1.0, 1.0])


def test_require_at_least_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from pba.benchmark import require_at_least

    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--warm-up", type=int, dest="warm_up")
    require_at_least(parser, parser.parse_args(["--warm-up", "0"]), {"warm_up": 0})  # at the minimum: fine
    with pytest.raises(SystemExit) as stop:
        require_at_least(parser, parser.parse_args(["--warm-up", "-1"]), {"warm_up": 0})
    assert stop.value.code == 2 and "bench: error: --warm-up must be at least 0, got -1" in capsys.readouterr().err
