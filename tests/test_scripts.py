"""The prepared GPU script and the benchmark scripts, shrunk and run on CPU: their flags and outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pba.benchmark import speedup_interval

ROOT = Path(__file__).resolve().parent.parent


def benchmark(script: str, *args: str, **options: object) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with ``args`` in a fresh interpreter; its exit status and output."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=600, **options)  # type: ignore[call-overload]


def assert_refuses(script: str, option: str, value: str, message: str) -> None:
    """``script`` exits with status 2 and ``message`` when ``option`` is ``value``."""
    bad = benchmark(script, option, value)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]


def test_gpu_check_smoke_on_cpu(imdb_dir: Path, shakespeare_dir: Path, mnist_dir: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this interpreter's python
        "PBA_GPU_CHECK_SMOKE": "1",
        "PBA_GPU_CHECK_DEVICE": "cpu",
        "PBA_GPU_CHECK_OUT": str(tmp_path),
        "PBA_IMDB_DIR": str(imdb_dir),
        "PBA_SHAKESPEARE_DIR": str(shakespeare_dir),
        "PBA_MNIST_DIR": str(mnist_dir),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stacked) on cpu:" in done.stdout  # the stacked grid ran, not the fallback

    bench = json.loads((tmp_path / "bench-attention-cuda.json").read_text())
    assert {row["dtype"] for row in bench["rows"]} == {"float32", "bfloat16"}
    assert bench["environment"]["device"] == "cpu"

    grid = json.loads((tmp_path / "imdb-seed-cuda.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in grid["runs"]) == [
        ("standard", 0), ("standard", 1), ("super", 0), ("super", 1)
    ]
    assert all(r["stack"] == [0, 1] and r["device"] == "cpu" and len(r["history"]) == 1 for r in grid["runs"])
    assert grid["settings"]["stack_seeds"] is True

    for task, metric in (("shakespeare", "test_loss"), ("mnist", "test_acc")):
        runs = json.loads((tmp_path / f"{task}-cuda.json").read_text())["runs"]
        assert sorted((r["variant"], r["seed"]) for r in runs) == [("standard", 0), ("super", 0)], task
        assert all(r["device"] == "cpu" and r[metric] == r[metric] for r in runs), task  # a number, not NaN


def test_imdb_profile_script(imdb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.txt"
    done = benchmark("imdb_profile.py", "--steps", "5", "--variant", "super", "--data-dir", str(imdb_dir),
                     "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "ms per training step" in text and "aten::bmm" in text and "transposed:" in text
    assert_refuses("imdb_profile.py", "--steps", "0", "--steps must be at least 1, got 0")


def test_gpt_speed_script(tmp_path: Path) -> None:
    """The GPT benchmark behind chapter 10: every contender timed, the same function checked, each
    paired interval around its estimate, and the diagnosis of layout and library both reported."""
    out, profile = tmp_path / "gpt.json", tmp_path / "profile.txt"
    done = benchmark("gpt_speed.py", "--threads", "1", "--rounds", "2", "--steps", "1", "--warmup", "0",
                     "--out", str(out), "--profile-out", str(profile))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    contenders = ["plain", "plain-apart", "standard", "optimised", "efficient", "super"]
    assert [row["contender"] for row in result["rows"]] == contenders
    # the three standard models compute one function: PlainGPT, its three-map twin and pba's GPT
    assert result["same_weights_max_logit_difference"] < 1e-5
    assert result["same_weights_max_logit_difference_apart"] < 1e-5
    rows = {row["contender"]: row for row in result["rows"]}
    assert rows["plain"]["parameters"] == rows["plain-apart"]["parameters"] == rows["standard"]["parameters"]
    assert rows["efficient"]["parameters"] < rows["optimised"]["parameters"] < rows["standard"]["parameters"]
    assert all(len(row["seconds_per_iteration"]) == 2 and min(row["seconds_per_iteration"]) > 0
               for row in result["rows"])
    # each interval is the one of its own pair of contenders, recomputed from the stored times
    times = {name: row["seconds_per_iteration"] for name, row in rows.items()}
    pairs = {"layout_speedup": ("plain", "plain-apart"), "library_speedup": ("plain-apart", "standard")}
    for part, (baseline, ours) in pairs.items():
        estimate, low, high, verdict = speedup_interval(times[baseline], times[ours])
        assert result[part] == {"geometric_mean": estimate, "low": low, "high": high, "verdict": verdict}
    assert (result["speedup_geometric_mean"], *result["speedup_interval_95"], result["speedup_verdict"]) == \
        speedup_interval(times["plain"], times["standard"])
    # plain -> plain-apart -> pba: the two steps multiply to the whole way
    layout, library = result["layout_speedup"]["geometric_mean"], result["library_speedup"]["geometric_mean"]
    assert layout * library == pytest.approx(result["speedup_geometric_mean"], rel=1e-9)
    assert "parameter tensors (AdamW, clipping): plain 52, plain-apart 68, pba 68" in profile.read_text()
    assert_refuses("gpt_speed.py", "--rounds", "1", "--rounds must be at least 2, got 1")


def test_generate_speed_script(tmp_path: Path) -> None:
    """The cache benchmark: cached and uncached samples agree (it stops otherwise), one row per variant."""
    out = tmp_path / "generate.json"
    done = benchmark("generate_speed.py", "--rounds", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["standard", "optimised", "efficient", "super"]
    for row in rows:
        assert row["tokens"] == 63 and len(row["cached_seconds"]) == len(row["uncached_seconds"]) == 2
        assert row["cached_tokens_per_second"] > 0 and row["uncached_tokens_per_second"] > 0
    assert_refuses("generate_speed.py", "--threads", "0", "--threads must be at least 1, got 0")


def test_imdb_floor_script(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    done = benchmark("imdb_floor.py", "--rounds", "1", "--reps", "3", "--variants", "efficient", "super",
                     "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["variants"]) == ["efficient", "super"]
    efficient, super_ = result["variants"]["efficient"], result["variants"]["super"]
    shared = {
        "embedding gather + dense gradient", "learned input projections", "output projection + FFN",
        "attention products (6)", "softmax + backward", "layer norms (2) + backward", "dropout random numbers",
        "fused Adam, all parameters",
    }
    assert set(efficient["kernels_ms"]) == shared  # efficient learns no W^A: no token mixing to time
    assert set(super_["kernels_ms"]) == shared | {"W^A token mixing"}
    for row in (efficient, super_):
        assert all(ms > 0 for ms in row["kernels_ms"].values())
        assert max(row["kernels_ms"].values()) < row["floor_ms"] < row["pba_step_ms"]  # a step runs them all and more
    # The seed protocol: 40,000 reviews / 64 = 625 steps per epoch, x 10 epochs x 5 seeds = 31,250
    # steps per variant, spread over 2 cores.
    minutes = lambda key: sum(row[key] for row in (efficient, super_)) * 31_250 / 1e3 / 2 / 60
    assert result["protocol_minutes"]["floor"] == pytest.approx(minutes("floor_ms"))
    assert result["protocol_minutes"]["pba_steps"] == pytest.approx(minutes("pba_step_ms"))
    assert result["protocol_minutes"]["floor"] < result["protocol_minutes"]["pba_steps"]
    if efficient["fused_step_ms"] is not None:  # pba.fused built here
        assert 0 < super_["fused_step_ms"] and "fused step / floor" in result["text"]
    assert result["text"] in done.stdout
    assert_refuses("imdb_floor.py", "--reps", "0", "--reps must be at least 1, got 0")


def run_manifest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "results_manifest.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_results_manifest_knows_every_committed_file() -> None:
    done = run_manifest("--check")
    assert done.returncode == 0, done.stderr
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "results").rglob("*") if p.is_file())
    listed = [line for line in done.stdout.splitlines() if line.startswith("results/")]
    assert listed == files
    lines = done.stdout.splitlines()
    recorded = json.loads((ROOT / "results" / "imdb-seed.json").read_text())["command"].strip()
    for path in ("results/imdb-seed.json", "results/imdb-seed.png"):  # a figure: its JSON's command
        assert lines[lines.index(path) + 1].strip().startswith(recorded + "  ")


def test_results_manifest_check_names_unknown_files(tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "grid.json").write_text(json.dumps({"command": "python -m pba.experiments imdb --out results/grid.json"}))
    (results / "grid.png").write_bytes(b"png")  # written with grid.json
    (results / "log.txt").write_text("command: python benchmarks/imdb_profile.py --out results/log.txt\n...")
    ok = run_manifest("--results", str(results), "--check")
    assert ok.returncode == 0, ok.stderr
    assert "results/grid.png\n    python -m pba.experiments imdb --out results/grid.json" in ok.stdout
    assert "results/log.txt\n    python benchmarks/imdb_profile.py --out results/log.txt" in ok.stdout

    (results / "sub" / "notes.txt").write_text("measured by hand: 100 s\n")
    (results / "orphan.svg").write_text("<svg/>")
    (results / "old.json").write_text(json.dumps({"runs": []}))
    bad = run_manifest("--results", str(results), "--check")
    assert bad.returncode == 1
    named = sorted(line.split(":")[0] for line in bad.stderr.splitlines())
    assert named == ["results/old.json", "results/orphan.svg", "results/sub/notes.txt"]
    assert run_manifest("--results", str(results)).returncode == 0  # without --check it only lists


def test_imdb_grid_configs_script(tmp_path: Path) -> None:
    """One configuration on a tiny IMDB look-alike: the report names its command and each grid's time."""
    from .synthetic import write_imdb_like

    data = write_imdb_like(tmp_path / "imdb", n_train=200, n_test=100)
    out = tmp_path / "configs.txt"
    env = {**os.environ, "PBA_CACHE_DIR": str(tmp_path / "cache")}
    done = benchmark("imdb_grid_configs.py", "--protocol", "paper", "--variants", "efficient", "--seeds", "2",
                     "--configs", "2", "--data-dir", str(data), "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0] == (f"command: python benchmarks/imdb_grid_configs.py --protocol paper --variants efficient --seeds 2 "
                        f"--configs 2 --data-dir {data} --out {out}")
    timed = [line for line in lines if line.startswith("python -m pba.experiments")]
    assert len(timed) == 1 and "--workers 2 --threads 1 --stack-seeds true --out g2.json: " in timed[0]
    assert float(timed[0].rsplit(": ", 1)[1].removesuffix(" s")) > 0
