"""The wheels the GPU machine lacks: which ones, are they all there, how big, and installing them there.

The GPU machine (bench/gpu_check.sh) has Python 3.12 with its own CUDA build of torch and numpy,
pandas, scipy, scikit-learn and matplotlib, and reaches no package registry. Everything else the
check imports travels with the working tree as cp312 manylinux wheels in a git-ignored folder
(default .gpu-wheels/), fetched here by bench/fetch_gpu_wheels.sh.

    python bench/gpu_wheels.py list                 # name==version of every wheel to bring (stdout)
    python bench/gpu_wheels.py missing .gpu-wheels  # those the folder lacks
    python bench/gpu_wheels.py repack .gpu-wheels   # large wheels recompressed (LZMA) to fit the 64 MiB
    python bench/gpu_wheels.py check .gpu-wheels    # every listed wheel present, cp312-compatible; sizes
    python bench/gpu_wheels.py install .gpu-wheels TARGET   # on the GPU machine: unpack into TARGET

Which: the closure of lungreg's requirements (and pytest, and snakemake's `reports` extra), read
from this environment's installed metadata with the markers evaluated for CPython 3.12 on Linux
x86_64, at this environment's versions (the project's pins), less what the GPU machine provides
(the six packages above and everything they require, except typing-extensions and packaging,
whose versions there may be too old) and less what the GPU run leaves out:
ANTsPy, ConvexAdam and elastix with its ITK (no classical baseline runs there), the SLURM executor
plugin, and PuLP (16 MB: Snakemake then needs `--scheduler greedy`, which the GPU tests pass).

Repack: a wheel is a zip; rewriting its members with LZMA keeps it a valid wheel (the RECORD hashes
are of the uncompressed files, and pip and `install` read LZMA members through zipfile): SimpleITK's
53 MB wheel becomes about 28 MB.

Install: a wheel's files unpacked into TARGET (its `.data/purelib` and `platlib` folded in), which
then goes first on PYTHONPATH; no pip, no venv, nothing of the machine's own installation changed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement  # packaging: on the GPU machine with matplotlib
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
PROVIDED = ("torch", "numpy", "pandas", "scipy", "scikit-learn", "matplotlib")  # on the GPU machine
# not used by the GPU run (the classical baselines: ANTsPy, ConvexAdam, elastix and its ITK)
LEFT_OUT = ("antspyx", "convexadam", "itk-elastix", "itk", "snakemake-executor-plugin-slurm", "pulp")
EXTRA_ROOTS = ("pytest",)
# Provided there too, but maybe older than the wheels here need (pydantic: typing-extensions>=4.16;
# snakemake: packaging<26,>=24): brought along, first on PYTHONPATH they shadow the machine's own
# (both keep their old API, so torch and matplotlib do not mind).
ALSO_BRING = ("typing-extensions", "packaging")
EXTRAS = {"snakemake": ("reports",)}
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
LIMIT_MIB = 64.0


def _requirements(name: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """A distribution's requirements that apply on the target (CPython 3.12, Linux), with `extras`."""
    found = []
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        applies = requirement.marker is None or any(
            requirement.marker.evaluate({**TARGET_ENV, "extra": extra}) for extra in ("", *extras)
        )
        if applies:
            found.append(requirement)
    return found


def _root(requirement: Requirement) -> tuple[str, tuple[str, ...]]:
    """A requirement as (name, the extras to follow)."""
    return requirement.name, tuple(requirement.extras) or EXTRAS.get(canonicalize_name(requirement.name), ())


def _closure(roots: list[tuple[str, tuple[str, ...]]], stop: set[str]) -> dict[str, str]:
    """{canonical name: installed version} of `roots` and everything they require, not below `stop`."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in stop or key in found:
            continue
        try:
            found[key] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is required on the GPU machine but not installed here: pip install -e '.[test]'")
        todo += [_root(r) for r in _requirements(name, extras)]
    return found


def wanted() -> dict[str, str]:
    """{name: version} of every wheel the GPU machine needs (see the module notes)."""
    provided = set(_closure([(name, ()) for name in PROVIDED], set()))
    stop = provided | {canonicalize_name(n) for n in LEFT_OUT}
    roots = [_root(r) for r in _requirements("lungreg")]
    roots += [(name, ()) for name in EXTRA_ROOTS]
    found = _closure(roots, stop)
    found.update({canonicalize_name(name): metadata.version(name) for name in ALSO_BRING})
    return dict(sorted(found.items()))


def _compatible_tags() -> set:
    from packaging import tags

    cpython = tags.cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=PLATFORMS)
    return set(cpython) | set(tags.compatible_tags((3, 12), "cp312", PLATFORMS))


def _wheels(folder: Path) -> dict[str, tuple[Path, str, frozenset]]:
    found = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
        found[canonicalize_name(name)] = (path, str(version), wheel_tags)
    return found


def tree_bytes() -> int:
    """What travels with a device run besides the carried folders: the tracked files and the
    untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((REPO / os.fsdecode(p)).stat().st_size for p in listed if p and (REPO / os.fsdecode(p)).is_file())


def missing(folder: Path) -> list[str]:
    """name==version of the wanted wheels that `folder` lacks (so a rerun fetches only those)."""
    have = _wheels(folder) if folder.exists() else {}
    return [f"{n}=={v}" for n, v in wanted().items() if n not in have or have[n][1] != v]


def check(folder: Path) -> int:
    """Print every wanted wheel with its size; non-zero when one is missing, incompatible or the
    folder and the working tree together exceed 64 MiB."""
    have, problems, total = _wheels(folder), [], 0
    ok_tags = _compatible_tags()
    for name, version in wanted().items():
        if name not in have:
            problems.append(f"missing: {name}=={version}")
            continue
        path, found_version, wheel_tags = have[name]
        size = path.stat().st_size
        total += size
        if found_version != version:
            problems.append(f"{path.name}: version {found_version}, wanted {version}")
        if not wheel_tags & ok_tags:
            problems.append(f"{path.name}: not installable on CPython 3.12 manylinux x86_64")
        print(f"{size / 2**20:8.2f} MiB  {path.name}")
    extra = sorted(set(have) - set(wanted()))
    for name in extra:
        total += have[name][0].stat().st_size
        print(f"{have[name][0].stat().st_size / 2**20:8.2f} MiB  {have[name][0].name}  (not needed)")
    tree = tree_bytes()
    print(
        f"wheels: {len(have)} files, {total / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB; "
        f"together {(total + tree) / 2**20:.1f} MiB of {LIMIT_MIB:.0f} MiB"
    )
    if (total + tree) / 2**20 > LIMIT_MIB:
        problems.append(f"wheels and tree together exceed {LIMIT_MIB:.0f} MiB")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


def repack(folder: Path, above_mib: float = 4.0) -> None:
    """Rewrite every wheel larger than `above_mib` with LZMA members (same name, same contents)."""
    for path in sorted(folder.glob("*.whl")):
        if path.stat().st_size < above_mib * 2**20:
            continue
        with zipfile.ZipFile(path) as source:
            if all(i.compress_type == zipfile.ZIP_LZMA for i in source.infolist()):
                continue
            temporary = path.with_suffix(".whl.tmp")
            with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_LZMA) as target:
                for info in source.infolist():
                    data = source.read(info)
                    info.compress_type = zipfile.ZIP_LZMA
                    target.writestr(info, data)
        before = path.stat().st_size
        os.replace(temporary, path)
        print(f"{path.name}: {before / 2**20:.1f} -> {path.stat().st_size / 2**20:.1f} MiB")


def install(folder: Path, target: Path) -> None:
    """Unpack every wheel of `folder` into `target` (purelib and platlib), checking each member's
    CRC as zipfile reads it."""
    target.mkdir(parents=True, exist_ok=True)
    data = re.compile(r"^[^/]+\.data/(purelib|platlib)/(.+)$")
    count = 0
    for path in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(path) as wheel:
            for info in wheel.infolist():
                name = info.filename
                folded = data.match(name)
                if folded:
                    name = folded.group(2)
                elif re.match(r"^[^/]+\.data/", name):
                    continue  # scripts, headers, data files: not needed to import
                destination = target / name
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(info) as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out, 2**20)
        count += 1
    print(f"unpacked {count} wheels into {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    sub.add_parser("missing").add_argument("folder", type=Path)
    for name in ("check", "repack"):
        sub.add_parser(name).add_argument("folder", type=Path)
    unpack = sub.add_parser("install")
    unpack.add_argument("folder", type=Path)
    unpack.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.command == "list":
        print("\n".join(f"{name}=={version}" for name, version in wanted().items()))
    elif args.command == "missing":
        print("\n".join(missing(args.folder)))
    elif args.command == "check":
        sys.exit(check(args.folder))
    elif args.command == "repack":
        repack(args.folder)
    else:
        install(args.folder, args.target)


if __name__ == "__main__":
    main()
