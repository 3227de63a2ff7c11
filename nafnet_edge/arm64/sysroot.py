"""The ARM64 sysroot: what running an artifact under qemu user-mode emulation needs, prepared once and cached.

``prepare`` is the only step that uses the network (Debian's arm64 packages through apt, aarch64 wheels through
pip); everything after it runs offline. The sysroot lives in one folder:

- ``root/``: Debian arm64 packages unpacked (``apt-get download`` + ``dpkg-deb -x``): the dynamic loader, libc,
  libstdc++, libgomp and Python 3.11 with its standard library (Debian 12's);
- ``site/``: the aarch64 wheels of the runtimes installed on this machine, at the same versions (``executorch``,
  ``ai-edge-litert``, ``numpy``, ``ml-dtypes``), unpacked by pip;
- ``bin/``: ``cpu_probe`` (the emulated CPU's HWCAPs and MIDR) and ``et_runner`` (ExecuTorch's C++ runtime behind
  a pipe), cross-compiled here with ``aarch64-linux-gnu-g++`` against the wheel's headers and libraries;
- ``hwcaps.json``: the names of the HWCAP bits, from the cross toolchain's kernel header ``asm/hwcap.h``;
- ``prepared.json``: what was prepared, written last: a folder without it is not a sysroot.

The folder is built beside its final place and renamed into it when complete, so an interrupted ``prepare``
leaves nothing half-made. Preparing again when the folder matches the installed runtimes does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from nafnet_edge import progress
from nafnet_edge.errors import MissingBackendError, NafnetEdgeError

QEMU = "qemu-aarch64-static"
CROSS_CXX = "aarch64-linux-gnu-g++"
CROSS_CC = "aarch64-linux-gnu-gcc"
CROSS_NM = "aarch64-linux-gnu-nm"
HWCAP_HEADER = Path("/usr/aarch64-linux-gnu/include/asm/hwcap.h")
MARKER = "prepared.json"
RECIPE = 2  # bump when the folder's layout or the way it is built changes
PYTHON = "python3.11"  # Debian 12's Python: the wheels are cp311
# Debian arm64 packages, with their dependencies: the loader, C and C++ runtimes, OpenMP and Python.
PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgomp1")
# The aarch64 wheels, each wanted when this machine has the distribution installed (at its version).
WHEELS = ("executorch", "ai-edge-litert", "numpy", "ml-dtypes")  # ml-dtypes: ai-edge-litert's CompiledModel buffers
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64")
ET_LIBS = (
    "executorch",
    "executorch_backend_xnnpack",
    "executorch_kernels_optimized",
    "executorch_kernels_quantized",
    "executorch_threadpool",
)
ENV_DIR = "NAFNET_EDGE_ARM64"
PREPARE_HINT = "run `nafnet-edge arm64 prepare` (once; it downloads the ARM64 sysroot)"


class SysrootError(MissingBackendError):
    """The ARM64 sysroot is missing, incomplete or cannot be built here (exit code 4)."""


@dataclass(frozen=True)
class Sysroot:
    """A prepared sysroot folder and what ``prepared.json`` says about it."""

    directory: Path
    versions: dict[str, str]  # distribution -> version of its aarch64 wheel
    qemu: str  # qemu's version line
    packages: list[str] = field(default_factory=list)  # the Debian packages unpacked into root/
    cpu_features_from: str | None = None  # where et_runner's CPU feature report comes from (None: none)

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def site(self) -> Path:
        return self.directory / "site"

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / PYTHON

    @property
    def et_runner(self) -> Path:
        return self.directory / "bin" / "et_runner"

    @property
    def cpu_probe(self) -> Path:
        return self.directory / "bin" / "cpu_probe"

    def has(self, distribution: str) -> bool:
        return distribution in self.versions

    def hwcap_names(self) -> dict[str, dict[int, str]]:
        """``{"hwcap": {bit: name}, "hwcap2": {...}}`` as the kernel names them."""
        data = json.loads((self.directory / "hwcaps.json").read_text())
        return {word: {int(bit): name for bit, name in bits.items()} for word, bits in data.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": RECIPE,
            "versions": self.versions,
            "qemu": self.qemu,
            "packages": self.packages,
            "cpu_features_from": self.cpu_features_from,
        }


# --- where ---------------------------------------------------------------------------------------------------------


def wanted_versions() -> dict[str, str]:
    """The runtimes installed on this machine whose aarch64 wheels the sysroot holds, at the same versions."""
    versions = {}
    for distribution in WHEELS:
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _sources_digest() -> str:
    digest = hashlib.sha256(str(RECIPE).encode())
    for name in ("et_runner.cpp", "cpu_probe.c"):
        digest.update(resources.files("nafnet_edge.arm64").joinpath(name).read_bytes())
    return digest.hexdigest()[:10]


def versions_key(versions: dict[str, str]) -> str:
    """The folder name of a sysroot for ``versions`` (and this release's runners)."""
    parts = [f"{name}-{version}" for name, version in sorted(versions.items())]
    return "_".join([*parts, _sources_digest()])


def default_directory() -> Path:
    """``$NAFNET_EDGE_ARM64`` when set, else ``~/.cache/nafnet-edge/arm64/<versions>`` (``$XDG_CACHE_HOME`` too)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "nafnet-edge" / "arm64" / versions_key(wanted_versions())


def read_sysroot(directory: Path) -> Sysroot | None:
    """The sysroot in ``directory``, or None when it holds none (no ``prepared.json``, or an unreadable one)."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("recipe") != RECIPE or not isinstance(data.get("versions"), dict):
        return None
    return Sysroot(
        directory=directory,
        versions={str(k): str(v) for k, v in data["versions"].items()},
        qemu=str(data.get("qemu", "")),
        packages=[str(p) for p in data.get("packages", [])],
        cpu_features_from=data.get("cpu_features_from"),
    )


def stale_reason(sysroot: Sysroot) -> str | None:
    """Why ``sysroot`` does not fit this machine's runtimes or this release's runners (None: it does)."""
    wanted = wanted_versions()
    if sysroot.versions != wanted:
        have = ", ".join(f"{k} {v}" for k, v in sorted(sysroot.versions.items()))
        want = ", ".join(f"{k} {v}" for k, v in sorted(wanted.items()))
        return f"it holds {have}; this machine has {want}"
    return None


def require_sysroot(directory: Path | None = None, *, needs: str | None = None) -> Sysroot:
    """The prepared sysroot (``directory`` or the default); a one-line :class:`SysrootError` saying to prepare it
    when it is missing, stale, or lacks the wheel ``needs``, or when qemu is not installed."""
    directory = directory or default_directory()
    sysroot = read_sysroot(directory)
    if sysroot is None:
        raise SysrootError(f"no ARM64 sysroot in {directory}: {PREPARE_HINT}")
    reason = stale_reason(sysroot)
    if reason:
        raise SysrootError(f"the ARM64 sysroot in {directory} is out of date ({reason}): {PREPARE_HINT}")
    if needs is not None and not sysroot.has(needs):
        raise SysrootError(f"the ARM64 sysroot in {directory} has no {needs}: pip install {needs}, then {PREPARE_HINT}")
    _require_tool(QEMU, "qemu-user-static")
    return sysroot


# --- prepare -------------------------------------------------------------------------------------------------------


def prepare(directory: Path | None = None, *, force: bool = False) -> tuple[Sysroot, bool]:
    """Build the sysroot in ``directory`` (default :func:`default_directory`) unless a complete one for this
    machine's runtimes is there (``force`` rebuilds it). Returns it and whether it was built now."""
    from nafnet_edge.atomic import output_lock, staged_directory

    directory = directory or default_directory()
    existing = read_sysroot(directory)
    if existing is not None and not force and stale_reason(existing) is None:
        return existing, False
    if existing is None and directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise SysrootError(f"{directory} exists and is not an ARM64 sysroot: choose a new or empty folder")
    versions = wanted_versions()
    if "executorch" not in versions and "ai-edge-litert" not in versions:
        raise SysrootError(
            "neither executorch nor ai-edge-litert is installed, so there is nothing to run on ARM64: "
            "pip install 'nafnet-edge[executorch]' or 'nafnet-edge[litert]'"
        )
    check_host()
    with output_lock(directory), staged_directory(directory) as tmp:
        sysroot = _build(tmp, versions)
        (tmp / MARKER).write_text(json.dumps(sysroot.to_dict(), indent=2) + "\n")
    return Sysroot(directory, sysroot.versions, sysroot.qemu, sysroot.packages, sysroot.cpu_features_from), True


def check_host() -> None:
    """What ``prepare`` needs on this machine: qemu, the cross compiler, and Debian's arm64 package index."""
    _require_tool(QEMU, "qemu-user-static")
    _require_tool(CROSS_CXX, "g++-aarch64-linux-gnu")
    _require_tool("apt-get", None)
    _require_tool("dpkg-deb", None)
    try:  # not importlib.util.find_spec("pip"): setuptools' distutils shim then switches itself off for the process
        metadata.version("pip")
    except metadata.PackageNotFoundError:
        raise SysrootError(
            f"preparing the ARM64 sysroot needs pip in {sys.executable}: {sys.executable} -m ensurepip"
        ) from None
    foreign = _output(["dpkg", "--print-foreign-architectures"]).split()
    if "arm64" not in foreign:
        raise SysrootError(
            "Debian's arm64 packages are not enabled on this machine: run, as root, "
            "`dpkg --add-architecture arm64 && apt-get update`, then prepare again"
        )


def _require_tool(name: str, package: str | None) -> None:
    if shutil.which(name) is None:
        install = f"apt-get install {package}" if package else "use a Debian or Ubuntu machine"
        raise SysrootError(f"ARM64 emulation needs {name}, which is not installed: {install}")


def _output(argv: Sequence[str], *, cwd: Path | None = None, what: str | None = None) -> str:
    """Run ``argv``; its stdout, or a :class:`SysrootError` with the last line it printed."""
    try:
        done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise SysrootError(f"cannot run {argv[0]}: {e.strerror or e}") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if line.startswith(("E:", "ERROR", "error"))), None)
        detail = last or (lines[-1] if lines else f"exit code {done.returncode}")
        raise SysrootError(f"{what or argv[0]} failed: {detail.strip()}")
    return done.stdout


def _build(tmp: Path, versions: dict[str, str]) -> Sysroot:
    packages = _debian_packages(tmp / "root", tmp / "debs")
    shutil.rmtree(tmp / "debs")
    _wheels(tmp / "site", tmp / "wheels", versions)
    shutil.rmtree(tmp / "wheels")
    (tmp / "bin").mkdir()
    progress.phase("arm64: cross-compile the CPU probe and the ExecuTorch runner")
    probe = resources.files("nafnet_edge.arm64").joinpath("cpu_probe.c")
    with resources.as_file(probe) as source:
        _output([CROSS_CC, "-O2", "-static", str(source), "-o", str(tmp / "bin" / "cpu_probe")], what="compiling")
    cpu_features_from = None
    if "executorch" in versions:
        cpu_features_from = _compile_et_runner(tmp)
    (tmp / "hwcaps.json").write_text(json.dumps(hwcap_names_from_header(HWCAP_HEADER), indent=2) + "\n")
    qemu = _output([QEMU, "--version"]).splitlines()[0].removeprefix("qemu-aarch64 version ").strip()
    return Sysroot(tmp, dict(versions), qemu, packages, cpu_features_from)


def _debian_packages(root: Path, debs: Path) -> list[str]:
    """Download :data:`PACKAGES` for arm64 with their dependencies and unpack them into ``root``."""
    progress.phase("arm64: download Debian's arm64 packages")
    wanted = [f"{name}:arm64" for name in PACKAGES]
    tree = _output(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            "--no-pre-depends",
            *wanted,
        ],
        what="apt-cache depends (run `apt-get update` if the arm64 index is missing)",
    )
    names = sorted({line.strip() for line in tree.splitlines() if line and not line[0].isspace()})
    names = [name for name in names if name.endswith(":arm64")]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise SysrootError(f"apt knows no {', '.join(missing)}: run `apt-get update`, then prepare again")
    debs.mkdir()
    _output(["apt-get", "download", "-q", *names], cwd=debs, what="apt-get download")
    root.mkdir()
    files = sorted(debs.glob("*.deb"))
    for deb in files:
        _output(["dpkg-deb", "-x", str(deb), str(root)], what=f"dpkg-deb -x {deb.name}")
    if not (root / "usr" / "bin" / PYTHON).is_file():
        raise SysrootError(f"the arm64 packages hold no usr/bin/{PYTHON}")
    return [deb.name for deb in files]


def _wheels(site: Path, wheels: Path, versions: dict[str, str]) -> None:
    """Download the aarch64 wheels of ``versions`` (cp311) and install them into ``site``."""
    progress.phase("arm64: download the aarch64 wheels (" + ", ".join(f"{k} {v}" for k, v in versions.items()) + ")")
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    target = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    pins = [f"{name}=={version}" for name, version in versions.items()]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _output([*pip, "download", "-q", "--no-deps", "-d", str(wheels), *target, *platforms, *pins], what="pip download")
    _output(
        [*pip, "install", "-q", "--no-deps", "--no-compile", "--target", str(site), *target, *platforms]
        + [str(w) for w in sorted(wheels.glob("*.whl"))],
        what="pip install --target",
    )


def _compile_et_runner(tmp: Path) -> str | None:
    """Cross-compile ``et_runner.cpp`` against the aarch64 ExecuTorch wheel; its CPU feature report reads
    cpuinfo's ``cpuinfo_isa`` (what XNNPACK dispatches on) through the ``cpuinfo.h`` torch ships, when that header
    matches the size of the wheel's ``cpuinfo_isa``. Returns where the report comes from (None: no report)."""
    et = tmp / "site" / "executorch"
    include = tmp / "build" / "include"
    stub = include / "torch" / "headeronly" / "macros" / "cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")  # the wheel's c10 headers include it; its macros are not needed here
    flags = ["-DNAFNET_NO_CPUINFO"]
    source_of_features = None
    isa_bytes = _symbol_size(et / "lib" / "libexecutorch_threadpool.so", "cpuinfo_isa")
    header = _torch_cpuinfo_header()
    if isa_bytes is not None and header is not None:
        shutil.copy(header, include / "cpuinfo.h")
        flags = [f"-DCPUINFO_ISA_BYTES={isa_bytes}"]
        source_of_features = "cpuinfo_isa of the ExecuTorch wheel's cpuinfo (what XNNPACK dispatches on)"
    runner = resources.files("nafnet_edge.arm64").joinpath("et_runner.cpp")
    with resources.as_file(runner) as source:
        argv = [
            CROSS_CXX,
            "-std=c++17",
            "-O2",
            "-w",
            *flags,
            f"-I{et / 'include'}",
            f"-I{et / 'include' / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}",
            f"-I{include}",
            str(source),
            "-o",
            str(tmp / "bin" / "et_runner"),
            f"-L{et / 'lib'}",
            "-Wl,--no-as-needed",
            *[f"-l{lib}" for lib in ET_LIBS],
            "-Wl,-rpath,$ORIGIN/../site/executorch/lib",
        ]
        try:
            _output(argv, what="compiling the ExecuTorch runner")
        except SysrootError:
            if source_of_features is None:
                raise
            argv[argv.index(flags[0])] = "-DNAFNET_NO_CPUINFO"  # a cpuinfo.h that does not fit: no feature report
            _output(argv, what="compiling the ExecuTorch runner")
            source_of_features = None
    shutil.rmtree(tmp / "build")
    return source_of_features


def _symbol_size(library: Path, symbol: str) -> int | None:
    if shutil.which(CROSS_NM) is None or not library.is_file():
        return None
    for line in _output([CROSS_NM, "-S", "-D", "--defined-only", str(library)]).splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3] == symbol:
            return int(parts[1], 16)
    return None


def _torch_cpuinfo_header() -> Path | None:
    try:
        files = metadata.files("torch") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).replace("\\", "/") == "torch/include/cpuinfo.h":
            path = Path(str(file.locate()))
            return path if path.is_file() else None
    return None


_HWCAP_DEFINE = re.compile(r"#define\s+(HWCAP2?)_(\w+)\s+\(1U?L?\s*<<\s*(\d+)\)")


def hwcap_names_from_header(header: Path) -> dict[str, dict[str, str]]:
    """The HWCAP and HWCAP2 bit names of the kernel header ``header`` as ``/proc/cpuinfo`` spells them
    (``HWCAP_ASIMDDP`` -> ``asimddp``, ``HWCAP2_SME_I8I32`` -> ``smei8i32``)."""
    names: dict[str, dict[str, str]] = {"hwcap": {}, "hwcap2": {}}
    try:
        text = header.read_text()
    except OSError:
        return names
    for word, name, bit in _HWCAP_DEFINE.findall(text):
        names[word.lower()][bit] = name.lower().replace("_", "")
    return names


def status_lines(directory: Path | None = None) -> tuple[list[str], bool]:
    """What ``nafnet-edge arm64 status`` prints, and whether the sysroot is ready to use."""
    directory = directory or default_directory()
    sysroot = read_sysroot(directory)
    if sysroot is None:
        return [f"no ARM64 sysroot in {directory}: {PREPARE_HINT}"], False
    lines = [
        f"ARM64 sysroot: {directory}",
        "  wheels: " + ", ".join(f"{k} {v}" for k, v in sorted(sysroot.versions.items())),
        f"  Debian packages: {len(sysroot.packages)}",
        f"  qemu: {sysroot.qemu}",
        f"  ExecuTorch runner: {'yes' if sysroot.et_runner.is_file() else 'no'}"
        + (f" (CPU features from {sysroot.cpu_features_from})" if sysroot.cpu_features_from else ""),
    ]
    reason = stale_reason(sysroot)
    try:
        _require_tool(QEMU, "qemu-user-static")
    except NafnetEdgeError as e:
        reason = reason or str(e)
    if reason:
        lines.append(f"  not usable: {reason}: {PREPARE_HINT}")
    return lines, reason is None
