"""Fault tolerance and reproducibility of the whole workflow on the tiny cohort (CPU).

* a training killed after a checkpoint resumes from it and ends with the weights and tables of
  an uninterrupted run;
* a registration chunk or a classifier fold killed midway leaves nothing Snakemake would take as
  finished; the rerun redoes only the killed and missing jobs and what depends on them;
* two runs from a clean results/ give byte-identical tables (timing columns dropped);
* every writer is atomic (temporary hidden name in the same folder, then rename);
* a corrupt intermediate file stops the job that reads it with a message that names the file and
  says how to recover;
* changing one subject's input reruns that subject's preprocessing and its dependents only.

The workflow tests start from copies of the session's `tiny_study` (shutil.copytree keeps the
modification times and Snakemake's metadata), never from scratch, except the reproducibility test.
"""

from __future__ import annotations

import ast
import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from workflow_runner import REPO, TINY, copy_workflow, job_counts, snakemake

from lungreg import io, torch_io
from lungreg.evaluate import TIMING_COLUMNS

TABLES = ["pairs", "landmarks", "table1_dice", "table2_landmarks", "jacobian", "endpoint_error"]
TABLE_TARGETS = [f"results/tables/{name}.tsv" for name in TABLES]  # rule tables, without the report
CLASSIFICATION_TARGET = "results/tables/classification.tsv"
POLL_SECONDS = 0.02
# Targets go after "--": workflow_runner puts `--configfile FILE` first, which takes every word up to
# the next option.


# ----------------------------------------------------------------------------- helpers


def copy_study(study: Path, destination: Path, remove: list[str] = ()) -> Path:
    """A finished study in a new folder (files, modification times, .snakemake metadata), less the
    outputs `remove` (files or folders). Snakemake rebuilds a deleted intermediate file only when
    something downstream is missing too, so callers remove the targets they ask for as well."""
    shutil.copytree(study, destination, symlinks=True)
    for name in remove:
        path = destination / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return destination


def without_timing(path: Path) -> list[str]:
    """The table's lines, byte for byte, with the columns that vary run to run removed."""
    lines = path.read_text().split("\n")
    header = lines[0].split("\t")
    keep = [i for i, column in enumerate(header) if column not in TIMING_COLUMNS]
    kept = []
    for line in lines:
        fields = line.split("\t")
        kept.append("\t".join(fields[i] for i in keep) if len(fields) == len(header) else line)
    return kept


def table_differences(workdir: Path, reference: Path, paths: list[str]) -> dict[str, str]:
    """{path: first difference} of the tables that differ once timing columns are dropped."""
    differences = {}
    for path in paths:
        ours, theirs = without_timing(workdir / path), without_timing(reference / path)
        if ours != theirs:
            line = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            header = theirs[0].split("\t")
            a = ours[line].split("\t") if line < len(ours) else []
            b = theirs[line].split("\t") if line < len(theirs) else []
            columns = [header[i] for i in range(min(len(a), len(b), len(header))) if a[i] != b[i]]
            differences[path] = f"line {line + 1}, column(s) {columns or '?'}: {a} != {b}"
    return differences


def assert_same_tables(workdir: Path, reference: Path, paths: list[str]) -> None:
    differences = table_differences(workdir, reference, paths)
    assert not differences, "tables differ from the reference run:\n" + "\n".join(
        f"{path}: {difference}" for path, difference in differences.items()
    )


def assert_same_model(path: Path, reference: Path) -> None:
    ours, theirs = torch_io.load_torch(path), torch_io.load_torch(reference)
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    differing = [k for k in theirs["state_dict"] if not bool((ours["state_dict"][k] == theirs["state_dict"][k]).all())]
    assert not differing, f"weights differ from the reference run in {differing}"
    assert ours["best_epoch"] == theirs["best_epoch"]


def incomplete_outputs(workdir: Path) -> set[str]:
    """Outputs Snakemake has marked incomplete (.snakemake/incomplete: base64 of each path)."""
    root = workdir / ".snakemake" / "incomplete"
    found = set()
    for marker in list(root.rglob("*")) if root.is_dir() else []:
        if marker.name.startswith("@") or marker.name == "migration_underway":
            continue
        encoded = "".join(part.removeprefix("@") for part in marker.relative_to(root).parts)
        try:
            name = base64.urlsafe_b64decode(encoded).decode()
        except ValueError:
            continue
        found.add(os.path.relpath(name, workdir) if os.path.isabs(name) else os.path.normpath(name))
    return found


def visible_temporary_files(folder: Path) -> list[Path]:
    """Temporary files of io.atomic_path that a user or a glob could take for an output."""
    return [p for p in folder.rglob("*.tmp*") if not p.name.startswith(".")]


def scheduled_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job of a `snakemake -n` listing."""
    jobs, rule = [], None
    for line in output.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):\s*$", line)
        if match:
            rule = match.group(1)
            jobs.append((rule, {}))
            continue
        match = re.match(r"^\s+wildcards: (.*)$", line)
        if match and rule is not None:
            jobs[-1][1].update(dict(item.split("=", 1) for item in match.group(1).split(", ")))
    return jobs


class Run:
    """Snakemake in the background, in its own process group (it and its jobs die together)."""

    def __init__(self, workdir: Path, targets: list[str]):
        self.workdir = workdir
        self.output = workdir / "snakemake_background.txt"
        command = [
            sys.executable,
            "-m",
            "snakemake",
            "--cores",
            "2",
            "--resources",
            "gpu=1",
            "--configfile",
            str(TINY),
            "--",
            *targets,
        ]
        with open(self.output, "w") as stream:
            self.process = subprocess.Popen(
                command, cwd=workdir, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
            )

    def tail(self) -> str:
        return self.output.read_text()[-6000:]

    def wait_for(self, condition, what: str, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"snakemake ended ({self.process.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} after {timeout} s:\n{self.tail()}")
            time.sleep(POLL_SECONDS)

    def kill(self) -> None:
        """SIGKILL snakemake and every job it started; wait until the whole group is gone."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        raise AssertionError("processes of the killed snakemake are still alive")


def rerun_after_kill(workdir: Path, targets: list[str], dry_run: bool = False) -> subprocess.CompletedProcess:
    """The documented recovery after a killed run: `--unlock`, then `--rerun-incomplete`."""
    snakemake(workdir, "--unlock")
    return snakemake(workdir, "--rerun-incomplete", *(["-n"] if dry_run else []), "--", *targets)


# ----------------------------------------------------------------------- 1. training


@pytest.mark.workflow
def test_training_killed_after_a_checkpoint_resumes_and_matches_an_uninterrupted_run(tiny_study, tmp_path):
    workdir = copy_study(
        tiny_study,
        tmp_path / "study",
        ["results/model/proposed", "results/logs/train/proposed.log", "results/registration/proposed", *TABLE_TARGETS],
    )
    model_folder = workdir / "results/model/proposed"
    train_log = workdir / "results/logs/train/proposed.log"

    run = Run(workdir, TABLE_TARGETS)
    checkpoint = model_folder / "checkpoint.pt"
    run.wait_for(checkpoint.exists, "the training checkpoint")
    run.kill()
    assert not (model_folder / "model.pt").exists(), "killed too late: the training had already finished"
    assert "results/model/proposed/model.pt" in incomplete_outputs(workdir)
    saved = torch_io.load_torch(checkpoint)
    for key in ("model", "optimizer", "scheduler", "state", "rng"):
        assert key in saved, f"the checkpoint lacks the {key} state"
    assert saved["state"]["epoch"] >= 1

    locked = snakemake(workdir, "--rerun-incomplete", "--", *TABLE_TARGETS, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr  # the kill left its lock
    rerun_after_kill(workdir, TABLE_TARGETS)
    text = train_log.read_text()
    resumed = re.search(r"resuming from \S*checkpoint\.pt after epoch (\d+)", text)
    assert resumed, f"the rerun did not resume from the checkpoint:\n{text[-3000:]}"
    assert int(resumed.group(1)) >= 1
    after = text[resumed.end() :]
    assert "epoch 1/" not in after, "the resumed training started again at epoch 1"
    assert_same_model(model_folder / "model.pt", tiny_study / "results/model/proposed/model.pt")
    assert_same_tables(workdir, tiny_study, ["results/model/proposed/training_log.tsv", *TABLE_TARGETS])


# ----------------------------------------------------------- 2. inference and folds


def chunk_outputs(method: str, protocol: str, chunk: int) -> list[str]:
    base = f"results/registration/{method}/{protocol}/chunk-{chunk}"
    return [base, f"{base}_metrics.tsv", f"{base}_landmarks.tsv"]


@pytest.mark.workflow
def test_registration_killed_midway_leaves_no_finished_looking_output_and_reruns_only_missing_chunks(
    tiny_study, tmp_path
):
    chunks = [("proposed", protocol, c) for protocol in ("inhale_exhale", "all_combinations") for c in (0, 1)]
    workdir = copy_study(
        tiny_study,
        tmp_path / "study",
        [
            *TABLE_TARGETS,
            *(p for c in chunks for p in chunk_outputs(*c)),
            *(f"results/logs/register/{m}_{p}_{c}.log" for m, p, c in chunks),
        ],
    )

    def states():
        marked = incomplete_outputs(workdir)
        done = [c for c in chunks if (workdir / chunk_outputs(*c)[1]).exists() and chunk_outputs(*c)[1] not in marked]
        running = [c for c in chunks if chunk_outputs(*c)[0] in marked and written(c)]
        return done, running, marked

    def written(chunk):  # the pairs' files already written by a running chunk job
        return [p for p in (workdir / chunk_outputs(*chunk)[0]).rglob("*.nii.gz") if not p.name.startswith(".")]

    run = Run(workdir, TABLE_TARGETS)
    run.wait_for(lambda: all(states()[:2]), "a finished chunk and a running chunk with files in its folder")
    run.kill()
    done, _, marked = states()
    killed = [c for c in chunks if any(p in marked for p in chunk_outputs(*c))]
    assert done and killed, f"killed at the wrong time: done {done}, killed {killed}"
    assert any(written(c) for c in killed)  # a directory output that exists, partly written
    for chunk in killed:
        for path in chunk_outputs(*chunk):
            if (workdir / path).exists():
                assert path in marked, f"{path} of the killed job is not marked incomplete"
        for file in (workdir / chunk_outputs(*chunk)[0]).rglob("*"):
            if file.is_file() and not file.name.startswith("."):  # written atomically: whole or absent
                io.read_intermediate_image(file) if file.name.endswith(".nii.gz") else sitk.ReadTransform(str(file))
    assert not visible_temporary_files(workdir / "results")
    missing = [c for c in chunks if c not in done]

    refused = snakemake(workdir, "-n", "--", *TABLE_TARGETS, check=False)
    message = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "--rerun-incomplete" in message
    assert all(chunk_outputs(*c)[0] in message for c in killed), message[-3000:]

    plan = rerun_after_kill(workdir, TABLE_TARGETS, dry_run=True)
    counts = job_counts(plan.stdout)
    assert counts.get("register_network") == len(missing) and counts.get("tables") == 1, counts
    assert set(counts) <= {"register_network", "tables", "total"}, counts
    planned = {
        (w["method"], w["protocol"], int(w["chunk"]))
        for rule, w in scheduled_jobs(plan.stdout)
        if rule == "register_network"
    }
    assert planned == set(missing)

    finished = {c: (workdir / chunk_outputs(*c)[1]).stat().st_mtime_ns for c in done}
    rerun_after_kill(workdir, TABLE_TARGETS)
    assert {c: (workdir / chunk_outputs(*c)[1]).stat().st_mtime_ns for c in done} == finished
    assert_same_tables(workdir, tiny_study, TABLE_TARGETS + [f"{chunk_outputs(*c)[1]}" for c in chunks])


CLASSIFY_SOURCE = "results/classification/proposed_refined"  # the tiny study's classify.method


def part_outputs(classifier: str, part: str) -> list[str]:
    base = f"{CLASSIFY_SOURCE}/{classifier}/{part}"
    return [f"{base}/predictions.tsv", f"{base}/classifier.pt"]


@pytest.mark.workflow
def test_classifier_job_killed_midway_reruns_only_the_missing_jobs(tiny_study, tmp_path):
    parts = [("cnn", "repeat-0"), ("cnn", "repeat-1"), ("logistic", "repeat-0"), ("logistic", "repeat-1")]
    summary = [f"{CLASSIFY_SOURCE}/{name}" for name in ("classification.tsv", "predictions.tsv", "roc.png")]
    workdir = copy_study(
        tiny_study,
        tmp_path / "study",
        [
            CLASSIFICATION_TARGET,
            "results/tables/classification_sources.tsv",
            *summary,
            *(p for f in parts for p in part_outputs(*f)),
            *(f"results/logs/classify/proposed_refined/{c}_{part}.log" for c, part in parts),
        ],
    )

    def states():
        marked = incomplete_outputs(workdir)
        done = [f for f in parts if all((workdir / p).exists() and p not in marked for p in part_outputs(*f))]
        running = [f for f in parts if any(p in marked for p in part_outputs(*f))]
        return done, running, marked

    run = Run(workdir, [CLASSIFICATION_TARGET])
    run.wait_for(lambda: all(states()[:2]), "a finished classifier job and a running one")
    run.kill()
    done, killed, marked = states()
    assert done and killed, f"killed at the wrong time: done {done}, killed {killed}"
    for part in killed:
        for path in part_outputs(*part):
            if (workdir / path).exists():
                assert path in marked, f"{path} of the killed job is not marked incomplete"
    assert not visible_temporary_files(workdir / "results")
    missing = [f for f in parts if f not in done]

    plan = rerun_after_kill(workdir, [CLASSIFICATION_TARGET], dry_run=True)
    counts = job_counts(plan.stdout)
    expected = {"classify_cnn", "classify_sklearn", "classify_summary", "classification_tables", "total"}
    assert set(counts) <= expected, counts
    planned = {
        (w["classifier"], w["part"])
        for rule, w in scheduled_jobs(plan.stdout)
        if rule in ("classify_cnn", "classify_sklearn")
    }
    assert planned == set(missing) and counts.get("classify_summary") == 1, (planned, counts)

    finished = {f: (workdir / part_outputs(*f)[0]).stat().st_mtime_ns for f in done}
    rerun_after_kill(workdir, [CLASSIFICATION_TARGET])
    assert {f: (workdir / part_outputs(*f)[0]).stat().st_mtime_ns for f in done} == finished
    assert_same_tables(workdir, tiny_study, [CLASSIFICATION_TARGET, f"{CLASSIFY_SOURCE}/predictions.tsv"])


# --------------------------------------------------------------------- 3. reproducibility


@pytest.mark.workflow
def test_two_clean_runs_give_byte_identical_tables(tiny_study, tmp_path):
    workdir = copy_workflow(tmp_path / "second")
    snakemake(workdir, "--", *TABLE_TARGETS, CLASSIFICATION_TARGET)
    tables = [*TABLE_TARGETS, CLASSIFICATION_TARGET, "results/tables/classification_sources.tsv"]
    assert_same_model(workdir / "results/model/proposed/model.pt", tiny_study / "results/model/proposed/model.pt")
    assert_same_tables(
        workdir,
        tiny_study,
        [*tables, "results/model/proposed/training_log.tsv", f"{CLASSIFY_SOURCE}/predictions.tsv"],
    )


# ------------------------------------------------------------------------ 4. atomic writes

KILLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import SimpleITK as sitk
    from lungreg import io
    array = np.random.default_rng(0).random((256, 256, 256), dtype=np.float32)
    io.write_image(sitk.GetImageFromArray(array), sys.argv[1])
""")


def test_a_killed_writer_leaves_no_file_under_the_final_name(tmp_path):
    target = tmp_path / "out" / "big.nii.gz"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)], env={**os.environ, "PYTHONPATH": str(REPO / "src")}
    )
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in target.parent.glob(".big.*")):
        assert writer.poll() is None, "the writer ended before it could be killed midway"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    writer.kill()
    writer.wait()
    assert not target.exists()
    leftovers = list(target.parent.iterdir())
    assert leftovers and all(p.name.startswith(".big.") and ".tmp" in p.name for p in leftovers), leftovers
    io.write_image(sitk.Image(4, 4, 4, sitk.sitkFloat32), target)  # a later writer is not disturbed
    assert io.read_intermediate_image(target).GetSize() == (4, 4, 4)


def _half_then_fail(path, *args, **kwargs):
    Path(path).write_bytes(b"\x1f\x8b partial")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("writer", ["image", "table", "torch", "figure", "transform"])
def test_a_writer_failing_halfway_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch, writer):
    import matplotlib.pyplot as plt
    import torch

    from lungreg import plots

    name = {"image": "a.nii.gz", "table": "a.tsv", "torch": "a.pt", "figure": "a.png", "transform": "a.tfm"}[writer]
    target = tmp_path / name
    target.write_bytes(b"previous")
    if writer == "image":
        monkeypatch.setattr(sitk, "WriteImage", lambda image, path, *a: _half_then_fail(path))
        write = lambda: io.write_image(sitk.Image(4, 4, 4, sitk.sitkFloat32), target)  # noqa: E731
    elif writer == "table":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full (simulated)")))
        write = lambda: io.write_table(pd.DataFrame({"x": np.arange(1000.0)}), target)  # noqa: E731
    elif writer == "torch":
        monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: _half_then_fail(path))
        write = lambda: torch_io.save_torch({"x": torch.zeros(3)}, target)  # noqa: E731
    elif writer == "figure":
        monkeypatch.setattr(plt.Figure, "savefig", lambda self, path, *a, **k: _half_then_fail(path))
        write = lambda: plots.save_figure(plt.figure(), target)  # noqa: E731
    else:  # as write_pair_files writes affine.tfm
        monkeypatch.setattr(sitk, "WriteTransform", lambda transform, path: _half_then_fail(path))

        def write():
            with io.atomic_path(target) as tmp:
                sitk.WriteTransform(sitk.AffineTransform(3), str(tmp))

    with pytest.raises(OSError, match="simulated"):
        write()
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


WRITE_METHODS = {
    "WriteImage",
    "WriteTransform",
    "savefig",
    "image_write",
    "to_filename",
    "to_parquet",
    "to_excel",
    "to_pickle",
    "to_feather",
    "imwrite",
    "write_text",
    "write_bytes",
}
STRING_OR_FILE = {"to_csv", "to_html", "to_json", "to_string", "to_latex", "to_markdown"}  # a string without a path
MODULE_WRITERS = {
    ("torch", "save"),
    ("np", "save"),
    ("np", "savez"),
    ("np", "savez_compressed"),
    ("np", "savetxt"),
    ("numpy", "save"),
    ("json", "dump"),
    ("pickle", "dump"),
    ("yaml", "dump"),
    ("yaml", "safe_dump"),
    ("shutil", "copy"),
    ("shutil", "copy2"),
    ("shutil", "copyfile"),
    ("shutil", "move"),
    ("sitk", "WriteImage"),
    ("sitk", "WriteTransform"),
}
SAFE_CONTEXTS = {"atomic_path", "TemporaryDirectory"}  # a hidden temporary beside the output / a private folder
ALLOWED = {("src/lungreg/workflow.py", "open"): "the rule's log file, appended to line by line by design"}


def _call_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def _direct_write(call: ast.Call) -> str | None:
    func, name = call.func, _call_name(call.func)
    owner = _call_name(func.value) if isinstance(func, ast.Attribute) else ""
    if isinstance(func, ast.Name) and name == "open":
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+"):
            return "open"
        return None
    if (owner, name) in MODULE_WRITERS:
        return f"{owner}.{name}"
    if isinstance(func, ast.Attribute) and name in WRITE_METHODS and owner != "io":
        return name
    if (
        isinstance(func, ast.Attribute)
        and name in STRING_OR_FILE
        and (call.args or any(k.arg in ("path_or_buf", "buf") for k in call.keywords))
    ):
        return name
    return None


class _DirectWrites(ast.NodeVisitor):
    def __init__(self):
        self.safe, self.found = 0, []

    def visit_With(self, node):
        safe = any(
            isinstance(i.context_expr, ast.Call) and _call_name(i.context_expr.func) in SAFE_CONTEXTS
            for i in node.items
        )
        for item in node.items:
            self.visit(item)
        self.safe += safe
        for statement in node.body:
            self.visit(statement)
        self.safe -= safe

    visit_AsyncWith = visit_With

    def visit_Call(self, node):
        what = _direct_write(node)
        if what and not self.safe:
            self.found.append((node.lineno, what))
        self.generic_visit(node)


def test_every_file_is_written_through_the_atomic_helpers():
    """No to_csv / WriteImage / torch.save / savefig / open(..., 'w') outside io.atomic_path."""
    offenders = []
    for path in sorted([*(REPO / "src/lungreg").rglob("*.py"), *(REPO / "scripts").glob("*.py")]):
        relative = str(path.relative_to(REPO))
        visitor = _DirectWrites()
        visitor.visit(ast.parse(path.read_text(), filename=relative))
        offenders += [f"{relative}:{line}: {what}" for line, what in visitor.found if (relative, what) not in ALLOWED]
    assert not offenders, "direct writes that bypass lungreg.io's atomic helpers:\n" + "\n".join(offenders)


def test_the_write_scan_catches_direct_writes():
    sample = textwrap.dedent("""
        frame.to_csv(path, sep="\\t")
        text = frame.to_csv(index=False)
        sitk.WriteImage(image, path)
        torch.save(obj, path)
        figure.savefig(path)
        open(path, "w").write("x")
        open(path).read()
        Path(path).write_text("x")
        io.write_text("x", path)
        with io.atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp))
    """)
    visitor = _DirectWrites()
    visitor.visit(ast.parse(sample))
    assert [what for _, what in visitor.found] == [
        "to_csv",
        "sitk.WriteImage",
        "torch.save",
        "savefig",
        "open",
        "write_text",
    ]


# ------------------------------------------------------------ 5. corrupt intermediate files


def failed_job_message(result: subprocess.CompletedProcess, log: Path, path: str) -> str:
    assert result.returncode != 0, "the job read a corrupt file without failing"
    text = log.read_text()
    expected = f"{path}: cannot be read"
    assert expected in text, f"the log does not name the corrupt file:\n{text[-3000:]}"
    assert expected in result.stdout + result.stderr, "snakemake's output does not show the message"
    return text[text.index(expected) :].splitlines()[0]


@pytest.mark.parametrize("name", ["image.nii.gz", "image.nii"])
@pytest.mark.parametrize("keep", [0.5, -4])
def test_a_truncated_nifti_is_reported_not_read_as_zeros(tmp_path, name, keep):
    """ITK itself reads a truncated NIfTI without complaint, the missing voxels as zeros."""
    path = tmp_path / name
    io.write_image(
        sitk.GetImageFromArray(np.arange(4000, dtype=np.float32).reshape(10, 20, 20)),
        path,
        compress=name.endswith(".gz"),
    )
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep > 0 else keep])
    with pytest.raises(io.CorruptFileError, match=f"{re.escape(str(path))}: cannot be read.*truncated.*--forcerun"):
        io.read_intermediate_image(path)
    with pytest.raises(io.InputError, match="truncated"):
        io.read_image(path, "sub-001")


@pytest.mark.workflow
def test_a_truncated_preprocessed_image_fails_with_a_recovery_message(tiny_study, tmp_path):
    workdir = copy_study(tiny_study, tmp_path / "study")
    target = chunk_outputs("unregistered", "inhale_exhale", 0)[1]
    subject = pd.read_csv(workdir / target, sep="\t")["fixed_subject"].iloc[0]
    image = f"results/preprocessed/{subject}/exhale_image.nii.gz"
    data = (workdir / image).read_bytes()
    (workdir / image).write_bytes(data[: len(data) // 2])
    result = snakemake(workdir, "--forcerun", target, "--", target, check=False)
    message = failed_job_message(result, workdir / "results/logs/register/unregistered_inhale_exhale_0.log", image)
    assert "delete it" in message and f"--forcerun {image}" in message


@pytest.mark.workflow
def test_a_garbage_model_file_fails_with_a_recovery_message(tiny_study, tmp_path):
    workdir = copy_study(tiny_study, tmp_path / "study")
    model = "results/model/proposed/model.pt"
    (workdir / model).write_bytes(np.random.default_rng(0).bytes(4096))
    target = chunk_outputs("proposed", "inhale_exhale", 0)[1]
    result = snakemake(workdir, "--forcerun", target, "--", target, check=False)
    message = failed_job_message(result, workdir / "results/logs/register/proposed_inhale_exhale_0.log", model)
    assert "delete it" in message and f"--forcerun {model}" in message


@pytest.mark.workflow
def test_a_garbage_training_checkpoint_fails_with_a_recovery_message(tiny_study, tmp_path):
    workdir = copy_study(tiny_study, tmp_path / "study")
    checkpoint = "results/model/proposed/checkpoint.pt"
    (workdir / checkpoint).write_bytes(np.random.default_rng(0).bytes(4096))
    target = "results/model/proposed/model.pt"
    result = snakemake(workdir, "--forcerun", target, "--", target, check=False)
    message = failed_job_message(result, workdir / "results/logs/train/proposed.log", checkpoint)
    assert "delete it" in message and "from epoch 1" in message  # --forcerun alone would read it again


# ------------------------------------------------------------------ 6. one subject changes


@pytest.mark.workflow
def test_changing_one_subjects_input_reruns_only_that_subject_and_its_dependents(tiny_study, tmp_path):
    workdir = copy_study(tiny_study, tmp_path / "study")
    cohort = pd.read_csv(workdir / "results/cohort/subjects.tsv", sep="\t")
    subject = cohort.loc[cohort["split"] == "train", "subject"].iloc[0]
    path = workdir / f"results/cohort/synthetic/{subject}/inhale.nii.gz"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[array.shape[0] // 2, array.shape[1] // 2, array.shape[2] // 2] += 1
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    io.write_image(changed, path)

    plan = snakemake(workdir, "-n")
    jobs = scheduled_jobs(plan.stdout)
    counts = job_counts(plan.stdout)
    assert [w["subject"] for rule, w in jobs if rule == "preprocess"] == [subject]
    for rule in ("synthesize_subject", "cohort_table", "classify_folds", "register_baseline"):
        assert rule not in counts, f"{rule} rescheduled: {counts}"  # a training subject: no baseline pairs
    assert counts.get("train") == 1
    holding = [
        c
        for c in (0, 1)
        if subject
        in set(pd.read_csv(workdir / chunk_outputs("unregistered", "inhale_exhale", c)[1], sep="\t")["fixed_subject"])
    ]
    unregistered = [(w["protocol"], int(w["chunk"])) for rule, w in jobs if rule == "register_unregistered"]
    assert unregistered == [("inhale_exhale", c) for c in holding]
