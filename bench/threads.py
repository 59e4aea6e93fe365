"""OpenMP wait policies under contention: a 2-thread conv3d forward + backward, alone and beside one
busy single-thread process, for each setting of OMP_WAIT_POLICY / GOMP_SPINCOUNT.

    python bench/threads.py                       # bench/results/threads.tsv (~3 min)
    python bench/threads.py --quick               # fewer repeats (bench/results/quick_threads.tsv)

Torch's CPU build runs its intra-op threads on GNU OpenMP (libgomp), which reads OMP_WAIT_POLICY and
GOMP_SPINCOUNT once, when torch is imported: each setting therefore runs in a fresh interpreter
with the variables in its environment (the workflow sets them for its jobs the same way, see
lungreg.workflow.JOB_ENVIRONMENT). A thread waiting at a barrier spins (ACTIVE; unset: 300 000
spins first) or sleeps at once (PASSIVE); when another process holds a core, a spinning thread
burns the time slice its partner needs. Rows: setting, shape, neighbour (none or one busy loop
`while True: pass` at the same priority), median and min seconds per forward + backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_average, machine, write_results  # noqa: E402

SETTINGS = {  # name: environment
    "unset": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "spin_30000": {"GOMP_SPINCOUNT": "30000"},
    "spin_3000": {"GOMP_SPINCOUNT": "3000"},
    "spin_300": {"GOMP_SPINCOUNT": "300"},
}
SHAPES = {"full": (2, 8, 24, 48, 48), "coarse": (2, 4, 12, 24, 24)}  # the default study's grid, and half of it
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

CHILD = """
import json, statistics, sys, time
import torch
threads, shape, repeats = int(sys.argv[1]), tuple(json.loads(sys.argv[2])), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
conv = torch.nn.Conv3d(shape[1], shape[1], 3, padding=1)
x = torch.randn(shape, requires_grad=True)
def step():
    conv(x).square().mean().backward()
for _ in range(3):
    step()
times = []
for _ in range(repeats):
    started = time.perf_counter()
    step()
    times.append(time.perf_counter() - started)
print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}))
"""


def measure(setting: str, shape: tuple[int, ...], threads: int, repeats: int) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    environment.update({**SETTINGS[setting], "OMP_NUM_THREADS": str(threads)})
    command = [sys.executable, "-c", CHILD, str(threads), json.dumps(shape), str(repeats)]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="8 repeats")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    repeats = 8 if args.quick else args.repeats
    out = args.out or ("quick_threads" if args.quick else "threads")
    meta = {**machine(), "threads": args.threads, "repeats": repeats, "command": " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    started, rows = time.perf_counter(), []
    for neighbour in ("none", "busy_loop"):
        busy = None
        if neighbour == "busy_loop":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1.0)
        try:
            for setting in args.settings.split(","):
                for shape_name, shape in SHAPES.items():
                    row = {
                        "setting": setting,
                        "shape": shape_name,
                        "neighbour": neighbour,
                        "load_1m_start": load_average(),
                    }
                    row.update(measure(setting, shape, args.threads, repeats))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    quiet = {(r["setting"], r["shape"]): r["median_s"] for r in rows if r["neighbour"] == "none"}
    for row in rows:
        row["over_unset_quiet"] = (
            row["median_s"] / quiet[("unset", row["shape"])] if ("unset", row["shape"]) in quiet else None
        )
        row["over_own_quiet"] = row["median_s"] / quiet[(row["setting"], row["shape"])]
    meta.update({"load_1m_end": load_average(), "wall_s": round(time.perf_counter() - started)})
    print(f"wrote {write_results(rows, out, meta)}", flush=True)


if __name__ == "__main__":
    main()
