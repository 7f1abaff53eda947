"""The prepared GPU script, shrunk and run on CPU: its flags and outputs, before any GPU time is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_on_cpu(imdb_dir: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this interpreter's python
        "PBA_GPU_CHECK_SMOKE": "1",
        "PBA_GPU_CHECK_DEVICE": "cpu",
        "PBA_GPU_CHECK_OUT": str(tmp_path),
        "PBA_IMDB_DIR": str(imdb_dir),
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


def test_imdb_profile_script(imdb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.txt"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "imdb_profile.py"), "--steps", "5", "--variant", "super",
         "--data-dir", str(imdb_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "ms per training step" in text and "aten::bmm" in text and "transposed:" in text
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "imdb_profile.py"), "--steps", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--steps must be a positive int, got 0" in bad.stderr


def test_imdb_floor_script(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "imdb_floor.py"), "--rounds", "1", "--reps", "3",
         "--variants", "efficient", "super", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["variants"]) == ["efficient", "super"]
    efficient, super_ = result["variants"]["efficient"], result["variants"]["super"]
    assert "W^A token mixing" in super_["kernels_ms"] and "W^A token mixing" not in efficient["kernels_ms"]
    for row in (efficient, super_):
        assert row["floor_ms"] == sum(row["kernels_ms"].values())
        assert 0 < row["floor_ms"] < row["pba_step_ms"]  # the step runs every kernel of the floor and more
    assert result["protocol_minutes"]["floor"] < result["protocol_minutes"]["pba_steps"]
    if efficient["fused_step_ms"] is not None:  # pba.fused built here
        assert 0 < super_["fused_step_ms"] and "fused step / floor" in result["text"]
    assert result["text"] in done.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "imdb_floor.py"), "--reps", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--reps must be a positive int, got 0" in bad.stderr
