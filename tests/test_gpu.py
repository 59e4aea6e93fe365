"""The CUDA path on a GPU: the tiny study end to end against a CPU run, prefetching, bf16, memory
formats, compile, cuDNN autotuning, CUDA timing and a deterministic mode.

    python -m pytest -m gpu -rs tests/test_gpu.py        # on a machine with CUDA (bench/gpu_check.sh)

Skipped, with the reason, where CUDA is absent; nothing here runs in the CPU test suite.
LUNGREG_GPU_REHEARSAL=1 runs every test on the CPU instead (the CPU run compared with a CPU run,
the checks that need CUDA streams skipped inside): the rehearsal of `bench/gpu_check.sh --cpu`,
which checks the tests' own code before a GPU minute is spent on it. LUNGREG_GPU_REPORT=FILE
appends what the tests measured (largest differences, the ops without a deterministic CUDA
kernel) to FILE, one JSON object per line, before each assertion, so that a failing check still
leaves its figures.

Tolerances, CUDA against CPU. cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa,
finer than bf16's 7), so a network's output on CUDA may move like bf16's: the bf16 tolerance of
tests/test_performance_options.py (1 Dice point, 0.25 voxel) bounds the single forward pass. The
end-to-end study also trains on each device, and the two trainings' rounding diverges through
Adam (whose first steps move each weight by about the learning rate whatever the gradient's size),
then refinement optimises each pair further: per pair, Dice within TOLERANCE["dice"] (fraction),
landmark and end-point errors within 1 mm, min det J within 0.15, and each method's mean Dice
within 1 point. These are stated, not yet measured on a GPU (the rehearsal compares the CPU with
itself): the check records the largest differences before it asserts, so the first GPU run gives
them either way.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

REHEARSAL = os.environ.get("LUNGREG_GPU_REHEARSAL") == "1"
CUDA = torch.cuda.is_available()
if not CUDA and not REHEARSAL:
    pytest.skip(
        "CUDA is not available (torch.cuda.is_available() is False); on a GPU machine run "
        "bench/gpu_check.sh, or LUNGREG_GPU_REHEARSAL=1 to rehearse these tests on the CPU",
        allow_module_level=True,
    )
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before its first use

from test_performance_options import (  # noqa: E402
    BF16_DICE_POINTS,
    BF16_GRID_VOXELS,
    grid_voxels,
    perturbed_network,
    volumes,
    warped_mask_dice,
)
from workflow_runner import TINY, copy_workflow, snakemake  # noqa: E402

from lungreg import torch_io  # noqa: E402
from lungreg.evaluate import TIMING_COLUMNS, load_phase  # noqa: E402
from lungreg.network.device import deterministic  # noqa: E402
from lungreg.network.losses import LossSettings  # noqa: E402
from lungreg.network.model import Acceleration, ModelSettings  # noqa: E402
from lungreg.network.refine import RefineSettings  # noqa: E402
from lungreg.network.train import TrainSettings, pair_files, train  # noqa: E402
from lungreg.registration.base import LoadedPair  # noqa: E402
from lungreg.registration.chunk import ChunkOutputs, run_chunk  # noqa: E402
from lungreg.registration.network import NetworkRegistrar  # noqa: E402
from lungreg.study import PreprocessedLayout, protocol_pairs  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda" if CUDA else "cpu")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA streams and events (rehearsal on the CPU)")
PROTOCOLS = ["inhale_exhale", "all_combinations", "cohort"]
NETWORK_METHODS = ("proposed", "proposed_refined")
TOLERANCE = {"dice": 0.02, "ds": 1.0, "epe_mean": 1.0, "jacobian_min": 0.15, "mean_dice_points": 1.0}


def record(check: str, **values) -> None:
    """What a check measured, into LUNGREG_GPU_REPORT (one JSON line), before it asserts."""
    path = os.environ.get("LUNGREG_GPU_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"check": check, "device": str(DEVICE), **values}, default=str) + "\n")


@pytest.fixture
def exact_float32():
    """Plain float32 convolutions and matmuls on CUDA (no TF32), for the "equal to plain" checks
    of options that only change how the work is done; restored afterwards."""
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = before


# ---------------------------------------------------------------- the tiny study, GPU and CPU


def overlay(device: str) -> dict:
    """The tiny study on one device, with every protocol; no SyN (ANTsPy is not on the GPU machine)
    and one repeat of the classification folds. The CPU rehearsal shrinks it further (6 subjects,
    one chunk per protocol, 2 folds): it checks the tests' code, on a shared 2-core machine."""
    config = {
        "inference": {"protocols": PROTOCOLS, "device": device, "prefetch": True},
        "train": {"device": device},
        "classify": {"repeats": 1, "cnn": {"device": device}},  # one repeat of the folds: 6 jobs, not 30
        "baselines": {"syn": {"enabled": False}},
    }
    if not CUDA:
        config["synthetic"] = {"n_subjects": 6, "n_ild": 3}
        config["split"] = {"n_validation": 2}
        config["inference"]["chunks"] = {"inhale_exhale": 1, "all_combinations": 1, "cohort": 1}
        config["classify"]["folds"] = 2
    return config


def run_study(folder: Path, device: str, cores: int) -> Path:
    workdir = copy_workflow(folder)
    config = folder / f"{device}.yaml"
    config.write_text(yaml.safe_dump(overlay(device)))
    # --scheduler greedy: PuLP (Snakemake's ILP scheduler) is left out of the GPU machine's wheels
    snakemake(workdir, "--cores", str(cores), "--scheduler", "greedy", timeout=2400, configfiles=(TINY, config))
    return workdir


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """The tiny study on DEVICE and on the CPU, side by side (each on half the cores). In the CPU
    rehearsal one run stands for both (two CPU runs are identical: tests/test_fault_tolerance.py)."""
    root = tmp_path_factory.mktemp("gpu_studies")
    if not CUDA:
        workdir = run_study(root / "cpu", "cpu", os.cpu_count() or 2)
        return {"device": workdir, "cpu": workdir}
    cores = max(1, (os.cpu_count() or 2) // 2)
    with ThreadPoolExecutor(2) as pool:
        runs = {
            "device": pool.submit(run_study, root / "device", DEVICE.type, cores),
            "cpu": pool.submit(run_study, root / "cpu", "cpu", cores),
        }
        return {name: run.result() for name, run in runs.items()}


def table(workdir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(workdir / "results" / "tables" / f"{name}.tsv", sep="\t")


def largest_differences(device_pairs: pd.DataFrame, cpu_pairs: pd.DataFrame) -> dict:
    """Per method: the largest per-pair difference of each scored column, and of the mean Dice."""
    keys = ["method", "protocol", "pair"]
    merged = device_pairs.merge(cpu_pairs, on=keys, suffixes=("", "_cpu"), validate="one_to_one")
    found = {}
    for method, rows in merged.groupby("method"):
        found[method] = {
            column: float(np.nanmax(np.abs(rows[column] - rows[f"{column}_cpu"]).to_numpy(dtype=float), initial=0.0))
            for column in ("dice", "ds", "epe_mean", "jacobian_min")
        }
        found[method]["mean_dice_points"] = float(100 * abs(rows["dice"].mean() - rows["dice_cpu"].mean()))
    return found


def test_tiny_study_on_the_gpu_matches_the_cpu_run_within_the_stated_tolerances(studies):
    device_pairs, cpu_pairs = table(studies["device"], "pairs"), table(studies["cpu"], "pairs")
    assert len(device_pairs) == len(cpu_pairs) > 0
    assert set(device_pairs["protocol"]) == set(PROTOCOLS)
    assert set(NETWORK_METHODS) <= set(device_pairs["method"])
    differences = largest_differences(device_pairs, cpu_pairs)
    record("study_gpu_vs_cpu", tolerance=TOLERANCE, largest=differences)
    for method, found in differences.items():
        if method in NETWORK_METHODS:
            for column, value in found.items():
                assert value <= TOLERANCE[column], f"{method}: {column} differs by {value:.4g} between GPU and CPU"
        else:  # the identity and SimpleITK run on the CPU in both runs: the same numbers
            assert all(value == 0 for value in found.values()), f"{method} differs between the two runs: {found}"


def test_the_gpu_study_ran_its_torch_jobs_on_the_gpu_and_timed_them(studies):
    workdir = studies["device"]
    pairs = table(workdir, "pairs")
    network = pairs[pairs["method"].isin(NETWORK_METHODS)]
    expected = torch.cuda.get_device_name(0) if CUDA else "cpu"
    assert set(network["device"]) == {expected}
    assert np.isfinite(network["seconds"]).all() and (network["seconds"] > 0).all()
    refined = pairs[pairs["method"] == "proposed_refined"]
    assert (refined["refine_steps"] > 0).all()
    per_pair = network.groupby(["method", "protocol"])["seconds"].median().to_dict()
    record("cuda_timing_rows", median_seconds_per_pair={f"{m}/{p}": s for (m, p), s in per_pair.items()})
    training_log = pd.read_csv(workdir / "results/model/proposed/training_log.tsv", sep="\t")
    assert set(training_log["device"]) == {DEVICE.type}
    cnn_lines = [
        line
        for log in (workdir / "results" / "logs").rglob("*.log")
        for line in log.read_text().splitlines()
        if "CNN trained on" in line
    ]
    assert cnn_lines and all(f"on {DEVICE.type}" in line for line in cnn_lines), cnn_lines[:3]
    classification = table(workdir, "classification")
    assert len(classification) == len(table(studies["cpu"], "classification"))


# ------------------------------------------------ one trained model, registered in this process


@pytest.fixture(scope="module")
def trained(studies):
    """The GPU study's preprocessed cohort and model."""
    workdir = studies["device"]
    cohort = pd.read_csv(workdir / "results/cohort/subjects.tsv", sep="\t")
    return {
        "layout": PreprocessedLayout(workdir / "results/preprocessed"),
        "model": str(workdir / "results/model/proposed/model.pt"),
        "pairs": {protocol: protocol_pairs(protocol, cohort, "exhale") for protocol in PROTOCOLS},
        "cohort": cohort,
    }


def registrar(trained, refined: bool = False, **options) -> NetworkRegistrar:
    name = "proposed_refined" if refined else "proposed"
    refine = RefineSettings() if refined else None  # the schema's refine: defaults (tests/test_config.py)
    return NetworkRegistrar(name, trained["model"], DEVICE.type, batch_size=2, refine=refine, **options)


def chunk_rows(registrar_, trained, protocol: str, folder: Path, pairs=None) -> pd.DataFrame:
    outputs = ChunkOutputs(folder, folder.with_suffix(".metrics.tsv"), folder.with_suffix(".landmarks.tsv"))
    pairs = trained["pairs"][protocol] if pairs is None else pairs
    rows = run_chunk(registrar_, pairs, trained["layout"], protocol, outputs, save_fields="none")
    return rows.drop(columns=[c for c in TIMING_COLUMNS if c in rows])


@pytest.mark.parametrize("refined", [False, True], ids=["proposed", "proposed_refined"])
def test_prefetch_on_and_off_give_the_same_rows_for_every_protocol(trained, tmp_path, refined):
    """Prefetching only reorders the host work: the plain network's rows are equal to the last
    digit; refinement backpropagates through grid_sample, whose CUDA backward accumulates with
    atomics (not bitwise reproducible), so its rows get the end-to-end tolerance."""
    largest = {}
    for protocol in PROTOCOLS:
        pairs = trained["pairs"][protocol][: 16 if refined else None]  # refinement: 60 steps a batch
        rows = {
            prefetch: chunk_rows(
                registrar(trained, refined, prefetch=prefetch),
                trained,
                protocol,
                tmp_path / f"{protocol}-{prefetch}",
                pairs,
            )
            for prefetch in (True, False)
        }
        assert list(rows[True]["pair"]) == [p.name for p in pairs]  # in order
        assert list(rows[True]["pair"]) == list(rows[False]["pair"])
        for column in ("dice", "ds", "jacobian_min"):
            difference = np.nanmax(np.abs(rows[True][column] - rows[False][column]).to_numpy(dtype=float), initial=0)
            largest[f"{protocol}/{column}"] = float(difference)
    record("prefetch_on_off", refined=refined, largest=largest)
    for key, value in largest.items():
        column = key.split("/")[1]
        assert value <= (TOLERANCE[column] if refined else 1e-6), f"{key} differs by {value:.3g} with prefetch"


def loaded(pairs, layout, size):
    """The pairs' phases read from disk, batch by batch (as run_chunk reads them)."""
    for start in range(0, len(pairs), size):
        phase = lambda subject, name: load_phase(layout, subject, name)  # noqa: E731
        yield [
            LoadedPair(p, phase(p.fixed_subject, p.fixed_phase), phase(p.moving_subject, p.moving_phase))
            for p in pairs[start : start + size]
        ]


@cuda_only
def test_prefetching_copies_on_the_side_stream_while_the_previous_batch_computes(trained, monkeypatch):
    """The GPU is kept busy for ~50 ms per batch (torch.cuda._sleep on the compute stream before
    the forward pass). Batch k+1 must be read from disk while batch k still computes; its copies,
    waited for alone right after it is queued, must be done while batch k still computes (on the
    compute stream they would queue behind it); each batch's results are read after its `done`
    event, and they equal, in order, those without prefetching (results read too early would be
    the uninitialised pinned buffers)."""
    fast = registrar(trained, prefetch=True)
    assert fast._copy_stream is not None and fast._copy_stream != torch.cuda.current_stream()
    clock_khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 2_000_000)  # an H200: ~1.98 GHz
    busy_cycles = int(clock_khz * 1e3 * 0.05)  # ~50 ms
    inner = fast._runner

    def slow_runner(moving, fixed):
        torch.cuda._sleep(busy_cycles)
        return inner(moving, fixed)

    fast._runner = slow_runner
    flights, copies = [], []
    seen = {"reads": 0, "read_while_busy": 0, "copies": 0, "copied_while_busy": 0}
    launch, to_device, finish = fast._launch, fast._to_device, fast._finish

    def spy_to_device(*host):
        moved, copied = to_device(*host)
        copies.append(copied)
        return moved, copied

    def spy_launch(batch):
        flight = launch(batch)
        if flights:  # batch k+1 queued: are its copies done while batch k still computes?
            copies[-1].synchronize()
            seen["copies"] += 1
            seen["copied_while_busy"] += not flights[-1].events[2].query()
        flights.append(flight)
        return flight

    def spy_finish(flight):
        results = finish(flight)
        assert flight.events[2].query(), "results read before the batch's done event"
        return results

    monkeypatch.setattr(fast, "_to_device", spy_to_device)
    monkeypatch.setattr(fast, "_launch", spy_launch)
    monkeypatch.setattr(fast, "_finish", spy_finish)
    pairs = trained["pairs"]["cohort"][:16]

    def batches():
        for batch in loaded(pairs, trained["layout"], fast.batch_size):
            if flights:  # batch k+1 has just been read: is batch k still computing?
                seen["reads"] += 1
                seen["read_while_busy"] += not flights[-1].events[2].query()
            yield batch

    streamed = list(fast.register_stream(batches()))
    record("prefetch_overlap", **seen, batches=len(streamed), busy_ms=50)
    assert [item.pair for batch, _ in streamed for item in batch] == pairs
    assert all(copied is not None for copied in copies), "a copy was not made on the side stream"
    assert seen["reads"] > 0 and seen["read_while_busy"] == seen["reads"], seen
    assert seen["copies"] > 0 and seen["copied_while_busy"] == seen["copies"], seen
    plain = registrar(trained, prefetch=False)
    reference = [r for batch in loaded(pairs, trained["layout"], plain.batch_size) for r in plain.register(batch)]
    for result, expected in zip((r for _, results in streamed for r in results), reference):
        np.testing.assert_allclose(result.displacement, expected.displacement, atol=1e-5)


# ------------------------------------------------------------ how the network runs on the device


@pytest.mark.parametrize("seed", range(3))
def test_bf16_and_tf32_on_the_device_stay_within_the_cpu_bf16_tolerance(seed):
    net = perturbed_network(seed)
    moving, fixed, moving_mask = volumes()
    with torch.no_grad():
        reference = net(moving, fixed)  # CPU float32
        on_device = copy.deepcopy(net).to(DEVICE)
        runs = {"fp32": on_device(moving.to(DEVICE), fixed.to(DEVICE))}
        with Acceleration(bf16=True).autocast(DEVICE):
            runs["bf16"] = on_device(moving.to(DEVICE), fixed.to(DEVICE))
    reference_dice = warped_mask_dice(net, moving_mask, reference.grid)
    found = {}
    for name, out in runs.items():
        grid = out.grid.float().cpu()
        found[name] = {
            "dice_points": 100 * abs(warped_mask_dice(net, moving_mask, grid) - reference_dice),
            "grid_voxels": grid_voxels(grid - reference.grid),
        }
    record("bf16_tf32_vs_cpu_fp32", seed=seed, found=found)
    for name, values in found.items():
        assert values["dice_points"] <= BF16_DICE_POINTS, f"{name}: {values}"
        assert values["grid_voxels"] <= BF16_GRID_VOXELS, f"{name}: {values}"


OPTIONS = {
    "channels_last": Acceleration(channels_last=True),
    "cudnn_benchmark": Acceleration(cudnn_benchmark=True),
    "compile": Acceleration(compile=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_memory_format_autotuning_and_compile_on_the_device_equal_the_plain_network(option, exact_float32, monkeypatch):
    """In plain float32 (no TF32) every option gives the plain network's output up to rounding.
    compile: the inductor backend on CUDA (Triton); in the CPU rehearsal aot_eager, as in
    tests/test_performance_options.py (inductor's C++ build takes minutes on 2 cores)."""
    if option == "compile":
        if not CUDA:
            compile_ = torch.compile
            monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="aot_eager", **kw))
        else:
            pytest.importorskip("triton", reason="torch.compile on CUDA needs Triton")
        torch._dynamo.reset()
    net = perturbed_network(1).to(DEVICE)
    moving, fixed, _ = (t.to(DEVICE) for t in volumes(batch=2))
    acceleration = OPTIONS[option]
    runner = acceleration.prepare(copy.deepcopy(net), DEVICE)
    with torch.no_grad():
        reference = net(moving, fixed)
        out = runner(*acceleration.inputs(moving, fixed))
        out = runner(*acceleration.inputs(moving, fixed))  # after autotuning / compilation
    if option == "cudnn_benchmark" and CUDA:
        assert torch.backends.cudnn.benchmark
    largest = {name: float((getattr(out, name) - getattr(reference, name)).abs().max()) for name in ("warped", "grid")}
    record("acceleration_equals_plain", option=option, largest=largest)
    for name in ("warped", "grid", "theta", "gradients"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- determinism

NONDETERMINISTIC = re.compile(r"^(\S+) does not have a deterministic implementation")


def train_once(trained, folder: Path) -> dict:
    cohort = trained["cohort"]
    train_rows = [p.as_row() for p in protocol_pairs("inhale_exhale", cohort[cohort["split"] == "train"], "exhale")]
    files = pair_files(train_rows, trained["layout"].root)
    settings = TrainSettings.from_config({"epochs": 1, "seed": 7, "device": DEVICE.type})
    checkpoint, history = train(
        files, files[:2], ModelSettings(width=0.125), LossSettings(beta=1e-2, mask_weighted=True), settings, None
    )
    path = folder / "model.pt"
    torch_io.save_torch(checkpoint, path)
    return {"history": history.drop(columns=["seconds"]), "model": str(path), "state": checkpoint["state_dict"]}


def test_deterministic_mode_gives_identical_inference_tables_and_names_what_training_lacks(trained, tmp_path):
    """Inference (the forward pass) in strict deterministic mode: two runs give identical rows.
    Training and refinement backpropagate through grid_sample, interpolate and pooling, whose
    CUDA backward kernels accumulate with atomics: in warn_only mode each such op warns with its
    name. Without any such op (the CPU) two strict runs must be identical; with them, the note
    lists the ops and whether two runs happened to agree."""
    with deterministic():
        first, second = (
            chunk_rows(registrar(trained), trained, "all_combinations", tmp_path / f"inference-{k}") for k in (1, 2)
        )
    pd.testing.assert_frame_equal(first, second, check_exact=True)

    runs, ops = [], set()
    for k in (1, 2):
        folder = tmp_path / f"train-{k}"
        folder.mkdir()
        with deterministic(warn_only=True), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = train_once(trained, folder)
            refined = {**trained, "model": run["model"]}
            run["rows"] = chunk_rows(registrar(refined, refined=True), refined, "inhale_exhale", folder / "chunk")
        ops |= {m.group(1) for w in caught if (m := NONDETERMINISTIC.match(str(w.message)))}
        runs.append(run)
    identical = {
        "training_log": runs[0]["history"].equals(runs[1]["history"]),
        "weights": all(torch.equal(runs[0]["state"][k], runs[1]["state"][k]) for k in runs[0]["state"]),
        "refined_rows": runs[0]["rows"].equals(runs[1]["rows"]),
    }
    record("deterministic", inference_identical=True, nondeterministic_ops=sorted(ops), training_identical=identical)
    if not ops:
        assert all(identical.values()), f"deterministic kernels only, yet two runs differ: {identical}"
