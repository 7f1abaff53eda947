"""Record how closely pba.keras follows the PyTorch layers on each Keras backend.

    python scripts/keras_backend_parity.py            # writes results/keras-backends.json

For every backend that is installed (tensorflow, jax, torch) it starts a process with
``KERAS_BACKEND`` set (Keras fixes its backend at import) and runs
:func:`pba.keras.parity.torch_parity` for each variant: the largest absolute differences of the
outputs and of the input gradients against the PyTorch layers, with padding and causal attention.
Chapter 9 shows the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pba.experiments.grid import environment  # noqa: E402
from pba.files import write_json_atomic  # noqa: E402

BACKENDS = ("tensorflow", "jax", "torch")

CHILD = """
import json, importlib.metadata as metadata
import keras, pba
from pba.keras.parity import torch_parity
backend = keras.backend.backend()
package = {"tensorflow": "tensorflow-cpu", "jax": "jax", "torch": "torch"}[backend]
try:
    version = metadata.version(package)
except metadata.PackageNotFoundError:
    version = metadata.version(backend)
print(json.dumps({"backend": backend, "version": version, "keras": keras.__version__,
                  "parity": {v: torch_parity(v) for v in pba.VARIANTS}}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "keras-backends.json")
    args = parser.parse_args(argv)
    rows = []
    for backend in BACKENDS:
        if importlib.util.find_spec(backend) is None:
            print(f"{backend}: not installed, skipped")
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{backend} failed:\n{done.stderr[-4000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        worst = max(max(v.values()) for v in row["parity"].values())
        print(f"{backend:<11} {row['version']:<10} largest difference from PyTorch: {worst:.1e}")
    command = "python " + shlex.join(["scripts/keras_backend_parity.py", *(argv if argv is not None else sys.argv[1:])])
    write_json_atomic(args.out, {"command": command, "environment": environment("cpu"), "backends": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
