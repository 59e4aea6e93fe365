"""Network speed and memory: forward pass per pair and training step (batch 2), by width and shape.

    python bench/network.py --parts forward      # bench/results/network_forward.tsv (~10 min on 2 quiet cores)
    python bench/network.py --parts train        # bench/results/network_train.tsv
    python bench/network.py --quick              # small shapes, one timed run: checks the script
                                                 # (bench/results/quick_network_*.tsv)

Every configuration runs in its own Python process, so an out-of-memory kill or a failure costs
one row (`status: skipped: reason`), not the bench. Per configuration: `--warmup` untimed calls,
then up to `--repeats` timed calls (stopping early once they add up to `--budget` seconds), each
synchronised (CUDA); the median is reported. Peak memory: the process's peak resident set
(getrusage ru_maxrss, so it includes the ~0.3-0.5 GB of Python + torch, given as baseline_rss_gb,
the peak before the first call) and, on CUDA, torch.cuda.max_memory_allocated.

Before each larger shape the time and memory of a call are predicted from the previous shape of
the same variant (linear in voxels); a configuration predicted to exceed `--max-call-s` or the
memory the bench may use (`--max-memory-gb`, default: the memory available just before the
configuration - 4 GB, at most 16 GB: the machine is shared) is recorded as skipped with the
prediction instead of being run.

The untrained network is used (its last layers are zero): the cost of a call does not depend on
the weights. CPU rows use fp32 unless `precision` says bf16 (CPU autocast, lungreg.network.model.Acceleration).
With a GPU, CUDA rows are measured (cudnn_benchmark on) in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import available_memory_gb, load_average, machine, run_child, summary, timed_runs, write_results  # noqa: E402

VARIANTS = {
    "paper": {"width": 1.0},
    "paper_fast": {"width": 1.0, "feature_reduction": 32, "deformable_stride": 2},
    "w0.25": {"width": 0.25},
    "w0.25_fast": {"width": 0.25, "feature_reduction": 16, "deformable_stride": 2},
}
SHAPES = ["32x96x96", "48x144x144", "64x192x192"]
QUICK_SHAPES = ["16x32x32", "24x48x48"]


def parse_shape(text: str) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in text.lower().split("x"))
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected DxHxW")
    return shape


# ---------------------------------------------------------------------------- the child


def child(config: dict) -> dict:
    """One configuration, measured in this process."""
    import torch

    from lungreg.network.losses import LossSettings, registration_loss
    from lungreg.network.model import Acceleration, ModelSettings, RegistrationNet

    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    torch.manual_seed(0)
    net = RegistrationNet(ModelSettings(**VARIANTS[config["variant"]]))
    acceleration = Acceleration(bf16=config["precision"] == "bf16", cudnn_benchmark=device.type == "cuda")
    runner = acceleration.prepare(net, device)
    shape, batch = parse_shape(config["shape"]), config["batch"]
    moving, fixed = (torch.rand(batch, 1, *shape, device=device) for _ in range(2))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    baseline_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    if config["part"] == "forward":
        net.eval()

        def step():
            with torch.no_grad(), acceleration.autocast(device):
                runner(moving, fixed)
    else:
        net.train()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        mask = torch.ones_like(fixed)
        settings = LossSettings(beta=1e-6, mask_weighted=False)  # the paper's loss

        def step():
            with acceleration.autocast(device):
                out = runner(moving, fixed)
            loss = registration_loss(settings, fixed, out.warped, out.theta, out.gradients, mask)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    times = timed_runs(step, config["warmup"], config["repeats"], config["budget_s"], sync)
    result = summary(times)
    result.update(
        {
            "per_pair_s": result["median_s"] / batch,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "baseline_rss_gb": baseline_gb,
            "cuda_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in net.parameters()),
            "status": "ok",
        }
    )
    return result


# --------------------------------------------------------------------------- the parent


def voxels(shape: str) -> int:
    return math.prod(parse_shape(shape))


def plan(args) -> list[dict]:
    import torch

    devices = ["cuda"] if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda" else ["cpu"]
    configs = []
    for part in args.parts:
        for device in devices:
            precisions = ["bf16", "fp32"] if device == "cuda" else ["fp32"]  # bf16 first: the GPU targets
            for variant in args.variants:
                for precision in precisions:
                    for shape in args.shapes:
                        configs.append(
                            {"part": part, "variant": variant, "shape": shape, "precision": precision, "device": device}
                        )
            if device == "cpu" and part == "forward":  # the cost of bf16 autocast on this CPU
                for variant in args.variants:
                    for shape in args.bf16_shapes:
                        configs.append(
                            {"part": part, "variant": variant, "shape": shape, "precision": "bf16", "device": device}
                        )
    return configs


KEY = ("part", "variant", "shape", "precision", "device", "batch")


def memory_limit_now(args) -> float:
    """What a configuration may use: --max-memory-gb, else the memory available right now - 4 GB
    (the machine is shared), at most 16 GB."""
    return args.max_memory_gb or max(1.0, min(16.0, available_memory_gb() - 4.0))


def parameters(variant: str) -> int:
    from lungreg.network.model import ModelSettings, RegistrationNet

    return sum(p.numel() for p in RegistrationNet(ModelSettings(**VARIANTS[variant])).parameters())


def existing_rows(name: str) -> list[dict]:
    import pandas as pd
    from _common import RESULTS

    path = RESULTS / f"{name}.tsv"
    if not path.exists():
        return []
    return (
        pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
        .astype(object)
        .where(lambda f: f.notna(), None)
        .to_dict("records")
    )


def earlier_runs(name: str) -> list[dict]:
    from _common import RESULTS

    path = RESULTS / f"{name}.json"
    if not path.exists():
        return []
    meta = json.loads(path.read_text())
    return meta.get("runs", [meta])


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with the rows of the same configuration replaced by `new` ones (others appended)."""
    fresh = {tuple(str(r[k]) for k in KEY): r for r in new}
    merged = [fresh.pop(tuple(str(r[k]) for k in KEY), r) for r in old]
    return merged + list(fresh.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="forward,train", type=lambda s: s.split(","))
    parser.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    parser.add_argument(
        "--shapes", default=None, type=lambda s: s.split(","), help="DxHxW,... (default: %s)" % ",".join(SHAPES)
    )
    parser.add_argument(
        "--bf16-shapes",
        default=None,
        type=lambda s: [v for v in s.split(",") if v],
        help="shapes with an extra CPU bf16-autocast forward row (default: the smallest)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--forward-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0, help="timed seconds per configuration (>= 1 run)")
    parser.add_argument(
        "--max-call-s", type=float, default=150.0, help="skip configurations predicted to take longer per call"
    )
    parser.add_argument("--max-memory-gb", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 timed run: checks the script in ~1 min")
    parser.add_argument("--out", default=None, help="results prefix: bench/results/OUT_PART.tsv (default network)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace this run's configurations in the existing tables, keep their other rows",
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    args.threads = args.threads or os.cpu_count()
    args.out = args.out or ("quick_network" if args.quick else "network")
    if args.quick:
        args.shapes = args.shapes or QUICK_SHAPES
        args.repeats, args.budget = 1, 10.0
    args.shapes = args.shapes or SHAPES
    args.bf16_shapes = args.shapes[:1] if args.bf16_shapes is None else args.bf16_shapes
    meta = {
        **machine(),
        "threads": args.threads,
        "memory_limit_gb_at_start": round(memory_limit_now(args), 1),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)
    started = time.perf_counter()
    rows, previous = [], {}
    kept = {part: existing_rows(f"{args.out}_{part}") if args.update else [] for part in args.parts}
    earlier = {part: earlier_runs(f"{args.out}_{part}") if args.update else [] for part in args.parts}
    for config in plan(args):
        key = (config["part"], config["variant"], config["precision"], config["device"])
        batch = args.forward_batch if config["part"] == "forward" else args.train_batch
        config.update(
            {
                "batch": batch,
                "threads": args.threads,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "budget_s": args.budget,
            }
        )
        row = {
            "part": config["part"],
            "variant": config["variant"],
            **{k: VARIANTS[config["variant"]].get(k) for k in ("width", "feature_reduction", "deformable_stride")},
            "shape": config["shape"],
            "batch": batch,
            "precision": config["precision"],
            "device": config["device"],
            "threads": args.threads,
            "warmup": args.warmup,
            "load_1m_start": load_average(),
        }
        reason = None
        if key in previous:
            last = previous[key]
            ratio = voxels(config["shape"]) / voxels(last["shape"])
            call_s = last["median_s"] * ratio
            memory = last["baseline_rss_gb"] + (last["peak_rss_gb"] - last["baseline_rss_gb"]) * ratio
            if config["device"] == "cuda" and last.get("cuda_peak_gb") is not None:
                memory = last["cuda_peak_gb"] * ratio
            if call_s > args.max_call_s:
                reason = (
                    f"skipped: predicted {call_s:.0f} s per call from {last['shape']} "
                    f"(> --max-call-s {args.max_call_s:.0f})"
                )
            elif config["device"] == "cpu" and memory > memory_limit_now(args):
                reason = (
                    f"skipped: predicted {memory:.1f} GB from {last['shape']} "
                    f"(> {memory_limit_now(args):.1f} GB the bench may use now)"
                )
        if reason:
            result = {"status": reason}
        else:
            timeout = 120 + (args.warmup + args.repeats + 1) * args.max_call_s * 2
            result = run_child(Path(__file__), config, timeout)
        row.update(
            {
                k: result.get(k)
                for k in (
                    "runs",
                    "median_s",
                    "per_pair_s",
                    "min_s",
                    "max_s",
                    "peak_rss_gb",
                    "baseline_rss_gb",
                    "cuda_peak_gb",
                    "parameters",
                )
            }
        )
        row["threads"] = result.get("threads", args.threads)
        row["status"] = result["status"]
        if result["status"] == "ok":
            previous[key] = {"shape": config["shape"], **result}
        rows.append(row)
        print(
            "\t".join(
                str(row[k]) for k in ("part", "variant", "shape", "precision", "median_s", "peak_rss_gb", "status")
            ),
            flush=True,
        )
        part_rows = merge(kept[row["part"]], [r for r in rows if r["part"] == row["part"]])
        for r in part_rows:
            r["parameters"] = parameters(r["variant"])
        run = {**meta, "load_1m_end": load_average(), "wall_s": round(time.perf_counter() - started)}
        write_results(part_rows, f"{args.out}_{row['part']}", {"runs": earlier[row["part"]] + [run]})
    print(f"wrote bench/results/{args.out}_*.tsv in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
