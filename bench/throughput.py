"""All-pairs throughput on a small preprocessed synthetic cohort: the network against SyN and SimpleITK.

    python bench/throughput.py                 # 5 subjects, 25 pairs: bench/results/throughput.tsv
    python bench/throughput.py --quick         # 3 subjects, 9 pairs (bench/results/quick_throughput.tsv)

The cohort is the default study's (config/config.yaml: synthetic, preprocess), synthesised and
preprocessed once into --workdir (kept, so reruns skip it). Pairs: the `cohort` protocol, every
subject's inhale onto every subject's exhale (N x N). Every method registers the same pairs in the
same process, on the same CPU threads, through lungreg.registration.chunk.run_chunk, which also scores
each pair (Dice, landmarks, Jacobian) and writes what save_fields asks for:

* pairs_per_s: pairs / wall time of the whole chunk, file reading, scoring and writing included;
* compute_s_per_pair: the registrar's own time per pair (the network's forward pass, a
  baseline's registration), the `seconds` column of the workflow's tables;
* syn_over_*: SyN's time divided by the row's (how many times faster than SyN).

Network rows use random last-layer weights (a few voxels of deformation) of each variant: speed does
not depend on the weights. Baselines use the workflow's options (config.yaml and the schema's
defaults). save_fields none must write no per-pair file at all: files_written counts what the
chunk left in its folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import files_under, load_average, machine, workflow_config, write_results  # noqa: E402

NETWORK_VARIANTS = {
    "w0.25": {"width": 0.25},
    "w0.25_fast": {"width": 0.25, "feature_reduction": 16, "deformable_stride": 2},
    "paper": {"width": 1.0},
    "paper_fast": {"width": 1.0, "feature_reduction": 32, "deformable_stride": 2},
}


def prepare_cohort(workdir: Path, n_subjects: int, config: dict):
    """Synthesise and preprocess the cohort (skipped when already there); returns (layout, pairs)."""
    import pandas as pd

    from lungreg.preprocess import PreprocessSettings, preprocess_subject
    from lungreg.study import PreprocessedLayout, protocol_pairs
    from lungreg.synthetic.render import synthesize_subject
    from lungreg.synthetic.settings import SyntheticCohortSettings

    settings = SyntheticCohortSettings.from_config(
        {**config["synthetic"], "n_subjects": n_subjects, "n_ild": n_subjects // 2}
    )
    section = dict(config["preprocess"])
    if section["grid_shape"] == "auto":  # as the workflow plans it: the synthetic field of view
        section["grid_shape"] = list(settings.covering_shape(section["factor"]))
    preprocess = PreprocessSettings.from_config(section, "exhale")
    layout = PreprocessedLayout(workdir / "preprocessed")
    for subject in settings.subject_ids():
        raw = workdir / "synthetic" / subject
        if not (raw / "parameters.json").exists():
            synthesize_subject(settings, subject, raw)
        if not layout.landmarks(subject, "exhale").exists():
            inputs = {item: raw / f"{item}.nii.gz" for item in ("inhale", "exhale", "inhale_mask", "exhale_mask")}
            inputs.update({f"{p}_landmarks": raw / f"{p}_landmarks.csv" for p in ("inhale", "exhale")})
            preprocess_subject(subject, inputs, preprocess, layout.root / subject)
    cohort = pd.DataFrame({"subject": settings.subject_ids()})
    return layout, protocol_pairs("cohort", cohort, "exhale")


def network_model(path: Path, variant: str) -> Path:
    import torch

    from lungreg import torch_io
    from lungreg.network.model import ModelSettings, RegistrationNet

    settings = ModelSettings(**NETWORK_VARIANTS[variant])
    torch.manual_seed(0)
    net = RegistrationNet(settings)
    for parameter in (net.deformable.head.weight, net.deformable.head.bias):
        torch.nn.init.normal_(parameter, std=0.02)
    torch_io.save_torch({"state_dict": net.state_dict(), "model_settings": settings.as_dict()}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch / ITK threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--variants", default="w0.25,w0.25_fast,paper,paper_fast", type=lambda s: s.split(","))
    parser.add_argument("--baselines", default="syn,sitk_bspline", type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lungreg-bench-cohort")
    parser.add_argument("--quick", action="store_true", help="3 subjects, the default variant only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.variants = 3, ["w0.25"]
    args.out = args.out or ("quick_throughput" if args.quick else "throughput")
    threads = args.threads or os.cpu_count()

    import torch

    from lungreg.registration.chunk import ChunkOutputs, build_registrar, run_chunk
    from lungreg.registration.network import NetworkRegistrar

    torch.set_num_threads(threads)
    config = workflow_config()
    meta = {**machine(), "threads": threads, "subjects": args.subjects, "command": " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    started = time.perf_counter()
    prepare_started = time.perf_counter()
    layout, pairs = prepare_cohort(args.workdir / f"n{args.subjects}", args.subjects, config)
    meta["cohort_prepare_s"] = round(time.perf_counter() - prepare_started, 1)
    scratch = Path(tempfile.mkdtemp(prefix="lungreg-bench-"))
    runs = [("network", v, "none") for v in args.variants] + [("network", args.variants[0], "all")]
    runs += [("baseline", b, "none") for b in args.baselines]
    rows = []
    try:
        for kind, name, save in runs:
            load = load_average()
            if kind == "network":
                registrar = NetworkRegistrar(
                    "proposed", network_model(scratch / f"{name}.pt", name), "cpu", args.batch_size, threads
                )
            else:
                options = {
                    k: v for k, v in config["baselines"][name].items() if k not in ("enabled", "protocols", "chunks")
                }
                registrar = build_registrar(name, threads, baseline_options=options)
            folder = scratch / f"{kind}-{name}-{save}"
            outputs = ChunkOutputs(
                folder, scratch / f"{folder.name}_metrics.tsv", scratch / f"{folder.name}_landmarks.tsv"
            )
            began = time.perf_counter()
            metrics = run_chunk(registrar, pairs, layout, "cohort", outputs, save_fields=save)
            wall = time.perf_counter() - began
            written = files_under(folder)
            if save == "none" and written:
                raise AssertionError(f"save_fields none wrote {written} files under {folder}")
            rows.append(
                {
                    "method": "proposed" if kind == "network" else name,
                    "variant": name if kind == "network" else "-",
                    "save_fields": save,
                    "pairs": len(pairs),
                    "batch_size": registrar.batch_size,
                    "threads": threads,
                    "wall_s": wall,
                    "pairs_per_s": len(pairs) / wall,
                    "compute_s_per_pair": float(metrics["seconds"].mean()),
                    "compute_s_per_pair_median": float(statistics.median(metrics["seconds"])),
                    "wall_s_per_pair": wall / len(pairs),
                    # random network weights: only the baselines' Dice means anything (a sanity check)
                    "dice_mean": float(metrics["dice"].mean()) if kind == "baseline" else None,
                    "files_written": written,
                    "load_1m_start": load,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        syn = next((r for r in rows if r["method"] == "syn"), None)
        for row in rows:
            row["syn_over_compute"] = syn["compute_s_per_pair"] / row["compute_s_per_pair"] if syn else None
            row["syn_over_wall"] = syn["wall_s_per_pair"] / row["wall_s_per_pair"] if syn else None
        meta.update({"load_1m_end": load_average(), "wall_s": round(time.perf_counter() - started)})
        print(f"wrote {write_results(rows, args.out, meta)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
