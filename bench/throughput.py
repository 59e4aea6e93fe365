"""All-pairs throughput on a small preprocessed synthetic cohort: the network against SyN and SimpleITK.

    python bench/throughput.py                 # 5 subjects, 25 pairs: bench/results/throughput.tsv
    python bench/throughput.py --quick         # 3 subjects, 9 pairs (bench/results/quick_throughput.tsv)
    python bench/throughput.py --configfile config/paper.yaml --synthesize-at-grid --subjects 41 --jobs 16 \
        --device cuda --variants paper --baselines "" --refined --max-pairs 24 --refined-pairs 16 \
        --stream-all --max-seconds 120 --out gpu_throughput      # the GPU check's (bench/gpu_check.sh)

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

Where a chunk's time goes, per pair (columns load_s, register_s, score_s, write_s, writer_thread_s
per pair): reading the phases, the registrar, scoring, and writing (the pairs' files for the
background writer, waiting for it, the tables); writer_thread_s is the writer thread's own time,
beside the rest. The library's `ChunkSeconds` gives them; a library from before it (--library-ref)
is timed from outside, its `load_phase`, `evaluate_pair` and `write_pair_files` wrapped in timers
and the rest counted as registering. --identity adds the `unregistered` row (loading, scoring and
writing alone). --budget-s stops a row after the sub-chunk (--chunk-pairs pairs) that crosses it.

    python bench/throughput.py --subjects 41 --variants w0.25_fast --baselines "" --identity \
        --no-save-all --save intra_patient --threads 2 --out cohort_default_after       # the default grid
    python bench/throughput.py ... --library-ref 3575d5f --out cohort_default_before    # the same, before
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, files_under, load_average, machine, workflow_config, write_results  # noqa: E402

WORKFLOW_KEYS = ("enabled", "protocols", "chunks", "subjects")  # a baseline's keys that are not its options
NETWORK_VARIANTS = {
    "w0.25": {"width": 0.25},
    "w0.25_fast": {"width": 0.25, "feature_reduction": 16, "deformable_stride": 2},
    "paper": {"width": 1.0},
    "paper_fast": {"width": 1.0, "feature_reduction": 32, "deformable_stride": 2},
}


def _prepare_subject(workdir: Path, settings, preprocess, subject: str) -> None:
    import SimpleITK as sitk

    from lungreg.preprocess import preprocess_subject
    from lungreg.study import PreprocessedLayout
    from lungreg.synthetic.render import synthesize_subject

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one subject per process
    layout = PreprocessedLayout(workdir / "preprocessed")
    raw = workdir / "synthetic" / subject
    if not (raw / "parameters.json").exists():
        synthesize_subject(settings, subject, raw)
    if not layout.landmarks(subject, "exhale").exists():
        inputs = {item: raw / f"{item}.nii.gz" for item in ("inhale", "exhale", "inhale_mask", "exhale_mask")}
        inputs.update({f"{p}_landmarks": raw / f"{p}_landmarks.csv" for p in ("inhale", "exhale")})
        preprocess_subject(subject, inputs, preprocess, layout.root / subject)


def settings_keys(settings_class, section: dict) -> dict:
    """The keys of a config section that the library's settings class takes: the workflow's own keys
    (preprocess.auto_mask, refine.protocols) left out, and with --library-ref an older library's
    fewer keys."""
    names = {f.name for f in dataclasses.fields(settings_class)}
    return {k: v for k, v in section.items() if k in names}


def resolved_preprocess(config: dict) -> dict:
    """The preprocess section with grid_shape auto resolved as the workflow plans it (the synthetic field of view)."""
    from lungreg.preprocess import PreprocessSettings
    from lungreg.synthetic.settings import SyntheticCohortSettings

    section = settings_keys(PreprocessSettings, config["preprocess"])
    if section["grid_shape"] == "auto":
        settings = SyntheticCohortSettings.from_config(config["synthetic"])
        section["grid_shape"] = list(settings.covering_shape(section["factor"]))
    return section


def prepare_cohort(workdir: Path, n_subjects: int, config: dict, jobs: int = 1, protocol: str = "cohort"):
    """Synthesise and preprocess the cohort (skipped when already there); returns (layout, pairs)."""
    import pandas as pd

    from lungreg.preprocess import PreprocessSettings
    from lungreg.study import PreprocessedLayout, protocol_pairs
    from lungreg.synthetic.settings import SyntheticCohortSettings

    settings = SyntheticCohortSettings.from_config(
        {**config["synthetic"], "n_subjects": n_subjects, "n_ild": n_subjects // 2}
    )
    preprocess = PreprocessSettings.from_config(resolved_preprocess(config), "exhale")
    subjects = settings.subject_ids()
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_prepare_subject, *zip(*[(workdir, settings, preprocess, s) for s in subjects])))
    else:
        for subject in subjects:
            _prepare_subject(workdir, settings, preprocess, subject)
    cohort = pd.DataFrame({"subject": subjects, "split": "validation"})
    return PreprocessedLayout(workdir / "preprocessed"), protocol_pairs(protocol, cohort, "exhale")


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


def stream_all(registrar, pairs, layout, max_seconds: float) -> dict:
    """Every pair through the registrar's pipeline (the GPU side: `_launch` pins, copies on the side
    stream, runs and copies the outputs back; waiting for each batch's `done` event replaces
    `_finish`'s conversion to physical fields), one batch in flight ahead as in register_stream.
    Each phase is read from disk once (timed). Stops after `max_seconds`."""
    import torch

    from lungreg.evaluate import load_phase
    from lungreg.registration.base import LoadedPair

    began = time.perf_counter()
    phases = {}
    for pair in pairs:
        for subject, phase in ((pair.fixed_subject, pair.fixed_phase), (pair.moving_subject, pair.moving_phase)):
            if (subject, phase) not in phases:
                phases[(subject, phase)] = load_phase(layout, subject, phase)
    read_s = time.perf_counter() - began
    done, pending, gpu_s = 0, None, 0.0
    for start in range(0, len(pairs), registrar.batch_size):
        batch = [
            LoadedPair(p, phases[(p.fixed_subject, p.fixed_phase)], phases[(p.moving_subject, p.moving_phase)])
            for p in pairs[start : start + registrar.batch_size]
        ]
        flight = registrar._launch(batch)
        if pending is not None:
            done += _wait(pending)
            gpu_s += pending.seconds if pending.events is None else _elapsed(pending)
        pending = flight
        if time.perf_counter() - began > max_seconds:
            break
    if pending is not None:
        done += _wait(pending)
        gpu_s += pending.seconds if pending.events is None else _elapsed(pending)
    if registrar.cuda:
        torch.cuda.synchronize()
    return {"pairs_done": done, "wall_s": time.perf_counter() - began, "read_s": read_s, "compute_s": gpu_s}


STAGES = ("load", "register", "score", "write", "writer")


def timed_chunks(run_chunk, pairs: list, chunk_pairs: int, budget_s: float | None) -> tuple[list, dict, float]:
    """run_chunk(pairs, seconds) over sub-chunks of `chunk_pairs` until `budget_s` (None: all pairs);
    returns (metrics tables, seconds by stage, wall seconds). A library whose run_chunk takes no
    `seconds` (before ChunkSeconds) is timed from outside: see the module's notes."""
    from lungreg.registration import chunk

    tables, totals, began = [], dict.fromkeys(STAGES, 0.0), time.perf_counter()
    own = "seconds" in inspect.signature(chunk.run_chunk).parameters
    wrapped = {"load_phase": "load", "evaluate_pair": "score", "write_pair_files": "write"}
    originals = {name: getattr(chunk, name) for name in wrapped if not own}

    def timer(stage, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[stage] += time.perf_counter() - started

        return call

    for name, function in originals.items():
        setattr(chunk, name, timer(wrapped[name], function))
    try:
        for start in range(0, len(pairs), chunk_pairs):
            started = time.perf_counter()
            if own:
                seconds = chunk.ChunkSeconds()
                tables.append(run_chunk(pairs[start : start + chunk_pairs], seconds=seconds))
                for stage, value in asdict(seconds).items():
                    totals[stage] += value
            else:
                outside = sum(totals.values())
                tables.append(run_chunk(pairs[start : start + chunk_pairs]))
                totals["register"] += time.perf_counter() - started - (sum(totals.values()) - outside)
            if budget_s is not None and time.perf_counter() - began > budget_s:
                break
    finally:
        for name, function in originals.items():
            setattr(chunk, name, function)
    return tables, totals, time.perf_counter() - began


def with_library(ref: str, arguments: list[str]) -> int:
    """This bench again, in a fresh interpreter whose `lungreg` is the one of git revision `ref`."""
    scratch = Path(tempfile.mkdtemp(prefix="lungreg-bench-library-"))
    try:
        archive = subprocess.run(["git", "archive", ref, "src"], cwd=REPO, capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(scratch, filter="data")
        path = os.pathsep.join(filter(None, [str(scratch / "src"), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, __file__, *arguments, "--library-label", ref]
        return subprocess.run(command, env={**os.environ, "PYTHONPATH": path}).returncode
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _wait(flight) -> int:
    if flight.events is not None:
        flight.events[2].synchronize()
    return len(flight.batch)


def _elapsed(flight) -> float:
    start, end, _ = flight.events
    return start.elapsed_time(end) / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch / ITK threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's inference batch_size")
    names = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    parser.add_argument("--variants", default="w0.25,w0.25_fast,paper,paper_fast", type=names)
    parser.add_argument("--baselines", default="syn,sitk_bspline", type=names)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lungreg-bench-cohort")
    parser.add_argument("--configfile", action="append", default=[], help="layered over config/config.yaml")
    parser.add_argument("--synthesize-at-grid", action="store_true", help="synthesise on the preprocessed grid")
    parser.add_argument("--jobs", type=int, default=1, help="processes preparing the cohort")
    parser.add_argument("--device", default="cpu", help="the network's device (cpu, cuda, auto)")
    parser.add_argument("--protocol", default="cohort", choices=["cohort", "inhale_exhale"])
    parser.add_argument("--refined", action="store_true", help="also the refined network (the config's refine:)")
    parser.add_argument("--max-pairs", type=int, default=None, help="register the first N pairs of each run")
    parser.add_argument("--refined-pairs", type=int, default=None, help="the refined row's N (default --max-pairs)")
    parser.add_argument("--stream-all", action="store_true", help="every pair through the network, not scored")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="the stream row's time budget")
    parser.add_argument("--no-save-all", action="store_true", help="leave out the save_fields all row")
    parser.add_argument("--prepare-only", action="store_true", help="prepare the cohort in --workdir, then stop")
    parser.add_argument("--quick", action="store_true", help="3 subjects, the default variant only")
    parser.add_argument("--identity", action="store_true", help="also the unregistered row (load, score, write)")
    parser.add_argument(
        "--save", default="none", choices=["none", "intra_patient", "all"], help="the rows' save_fields"
    )
    parser.add_argument("--chunk-pairs", type=int, default=None, help="pairs per run_chunk call (default: all)")
    parser.add_argument("--budget-s", type=float, default=None, help="a row stops after the sub-chunk crossing this")
    parser.add_argument("--library-ref", default=None, help="run with the lungreg of this git revision")
    parser.add_argument("--library-label", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.library_ref:
        arguments = sys.argv[1:]
        at = arguments.index("--library-ref")
        sys.exit(with_library(args.library_ref, arguments[:at] + arguments[at + 2 :]))
    if args.quick:
        args.subjects, args.variants = 3, ["w0.25"]
    args.out = args.out or ("quick_throughput" if args.quick else "throughput")
    threads = args.threads or os.cpu_count()

    import pandas as pd
    import SimpleITK as sitk
    import torch

    from lungreg.network.model import Acceleration
    from lungreg.network.refine import RefineSettings
    from lungreg.registration.chunk import ChunkOutputs, build_registrar, run_chunk
    from lungreg.registration.network import NetworkRegistrar

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)  # reading, writing (and the old scoring's warps)
    config = workflow_config(*args.configfile)
    if args.synthesize_at_grid:
        config["synthetic"]["shape"] = list(config["preprocess"]["grid_shape"])
        config["preprocess"]["factor"] = 1.0
    inference = config["inference"]
    batch_size = args.batch_size or inference["batch_size"]
    meta = {
        **machine(),
        "threads": threads,
        "subjects": args.subjects,
        "grid": "x".join(map(str, resolved_preprocess(config)["grid_shape"])),
        "inference": {k: inference[k] for k in ("bf16", "channels_last", "cudnn_benchmark", "compile", "prefetch")},
        "library": args.library_label or "working tree",
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)
    started = time.perf_counter()
    grid = meta["grid"]
    layout, pairs = prepare_cohort(
        args.workdir / f"n{args.subjects}_{grid}", args.subjects, config, args.jobs, args.protocol
    )
    meta["cohort_prepare_s"] = round(time.perf_counter() - started, 1)
    print(f"cohort ready: {len(pairs)} pairs in {meta['cohort_prepare_s']} s", flush=True)
    if args.prepare_only:
        return
    scratch = Path(tempfile.mkdtemp(prefix="lungreg-bench-"))
    runs = [("identity", "unregistered", "none", False)] if args.identity else []  # the workflow writes none
    runs += [("network", v, args.save, False) for v in args.variants]
    if args.variants and not args.no_save_all:
        runs.append(("network", args.variants[0], "all", False))
    if args.variants and args.refined:
        runs.append(("network", args.variants[0], "none", True))
    if args.variants and args.stream_all:
        runs.append(("stream", args.variants[0], "none", False))
    runs += [("baseline", b, args.save, False) for b in args.baselines]
    rows = []

    def network(variant: str, refined: bool) -> NetworkRegistrar:
        return NetworkRegistrar(
            "proposed_refined" if refined else "proposed",
            network_model(scratch / f"{variant}.pt", variant),
            args.device,
            batch_size,
            threads,
            acceleration=Acceleration.from_config(inference),
            prefetch=inference["prefetch"],
            refine=RefineSettings.from_config(settings_keys(RefineSettings, config["refine"])) if refined else None,
        )

    try:
        for kind, name, save, refined in runs:
            load = load_average()
            limit = args.refined_pairs or args.max_pairs if refined else args.max_pairs
            chosen = pairs[:limit] if limit else pairs
            if kind in ("network", "stream"):
                registrar = network(name, refined)
            elif kind == "identity":
                registrar = build_registrar(name, threads)
            else:
                options = {k: v for k, v in config["baselines"][name].items() if k not in WORKFLOW_KEYS}
                registrar = build_registrar(name, threads, baseline_options=options)
            row = {
                "method": registrar.name if kind != "baseline" else name,
                "kind": kind,
                "variant": name if kind in ("network", "stream") else "-",
                "library": meta["library"],
                "grid": grid,
                "device": registrar.device,
                "save_fields": save,
                "pairs": len(pairs),
                "batch_size": registrar.batch_size,
                "threads": threads,
                "load_1m_start": load,
            }
            if kind == "stream":
                found = stream_all(registrar, pairs, layout, args.max_seconds)
                wall, measured = found["wall_s"], found["pairs_done"]
                row.update(
                    {
                        "measured_pairs": measured,
                        "wall_s": wall,
                        "read_s": found["read_s"],
                        "pairs_per_s": measured / wall,
                        "compute_s_per_pair": found["compute_s"] / measured,
                        "wall_s_per_pair": wall / measured,
                        "all_pairs_s": wall if measured == len(pairs) else wall / measured * len(pairs),
                    }
                )
            else:
                folder = scratch / f"{kind}-{name}-{save}-{int(refined)}"
                outputs = ChunkOutputs(
                    folder, scratch / f"{folder.name}_metrics.tsv", scratch / f"{folder.name}_landmarks.tsv"
                )

                def one_chunk(part, **seconds):
                    return run_chunk(registrar, part, layout, args.protocol, outputs, save_fields=save, **seconds)

                tables, stages, wall = timed_chunks(one_chunk, chosen, args.chunk_pairs or len(chosen), args.budget_s)
                metrics = pd.concat(tables, ignore_index=True)
                written = files_under(folder)
                if save == "none" and written:
                    raise AssertionError(f"save_fields none wrote {written} files under {folder}")
                measured = len(metrics)
                row.update(
                    {
                        "measured_pairs": measured,
                        "wall_s": wall,
                        "pairs_per_s": measured / wall,
                        "compute_s_per_pair": float(metrics["seconds"].mean()),
                        "compute_s_per_pair_median": float(statistics.median(metrics["seconds"])),
                        "wall_s_per_pair": wall / measured,
                        "all_pairs_s": wall / measured * len(pairs),
                        **{f"{stage}_s_per_pair": value / measured for stage, value in stages.items()},
                        "score_io_s_per_pair": sum(stages[s] for s in ("load", "score", "write")) / measured,
                        # random network weights: only the baselines' Dice means anything (a sanity check)
                        "dice_mean": float(metrics["dice"].mean()) if kind == "baseline" else None,
                        "refine_steps_mean": float(metrics["refine_steps"].mean()) if refined else None,
                        "files_written": written,
                    }
                )
                shutil.rmtree(folder, ignore_errors=True)
            if registrar.device != "cpu":
                row["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
        syn = next((r for r in rows if r["method"] == "syn"), None)
        for row in rows:
            timed = syn and row["compute_s_per_pair"] > 0  # the identity computes nothing
            row["syn_over_compute"] = syn["compute_s_per_pair"] / row["compute_s_per_pair"] if timed else None
            row["syn_over_wall"] = syn["wall_s_per_pair"] / row["wall_s_per_pair"] if syn else None
        meta.update({"load_1m_end": load_average(), "wall_s": round(time.perf_counter() - started)})
        print(f"wrote {write_results(rows, args.out, meta)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
