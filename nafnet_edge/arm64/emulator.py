"""An artifact in its own runtime on an emulated ARM64 CPU: one qemu user-mode process per artifact and CPU model,
fed every tile through a pipe, so the emulator and the runtime start once.

The runners speak one protocol: after loading the artifact they write one JSON line (the input and output
tensors: dtype, shape, bytes); then each input tensor written to their stdin, raw, gets its output tensor back on
stdout, raw. ExecuTorch runs through ``et_runner`` (its C++ ``Module`` API, as an Android app's JNI layer calls
it: ExecuTorch's Python bindings need libtorch, whose aarch64 wheels are CUDA builds that cannot load here);
LiteRT through ``litert_runner.py`` in the sysroot's Python with the aarch64 ``ai-edge-litert`` wheel.

qemu 7.2 gives an aarch64 program the host's ``/proc/cpuinfo`` (an x86 one); CPU detection libraries then see
no ARM core at all, and the cpuinfo inside ai-edge-litert dereferences a null pointer. Each run therefore gets a
``/proc/cpuinfo`` describing the emulated CPU as an arm64 Linux kernel would: one entry per host processor with
the ``Features`` of the emulated CPU's HWCAPs and the implementer, variant, part and revision of its MIDR_EL1,
both read from the emulated CPU by ``cpu_probe``. qemu looks a file up in its ``-L`` prefix first, so the
prefix of a run is a folder of links to the sysroot's top-level folders plus ``proc/cpuinfo``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from nafnet_edge.arm64.sysroot import QEMU, Sysroot, SysrootError
from nafnet_edge.errors import NafnetEdgeError

# A dot-product core (Cortex-A76, Armv8.2) and qemu's "max" core without SME: i8mm, bf16, SVE2 (Armv8.6+/v9).
# With SME on, XNNPACK takes its SME int8 kernels, whose output under qemu 7.2 is far from every other CPU's
# (docs/arm64.md); phones with i8mm and without SME are the ones in use.
DEFAULT_CPUS = ("cortex-a76", "max,sme=off")
RUNNERS = {"executorch": "executorch C++ Module", "litert": "ai-edge-litert interpreter"}
_STDERR_TAIL = 400


class EmulationError(NafnetEdgeError):
    """The emulated runtime failed (crashed, refused the artifact, or broke the protocol)."""


@dataclass(frozen=True)
class EmulatedCPU:
    """What the emulated CPU reports about itself."""

    model: str  # qemu's -cpu name
    hwcap: int
    hwcap2: int
    midr: int  # MIDR_EL1; 0 when the CPU does not let user space read it
    features: tuple[str, ...]  # HWCAP and HWCAP2 names, as /proc/cpuinfo lists them

    def cpuinfo(self, processors: int) -> str:
        """``/proc/cpuinfo`` as arm64 Linux writes it for ``processors`` cores of this CPU."""
        entry = (
            "processor\t: {i}\n"
            f"Features\t: {' '.join(self.features)}\n"
            f"CPU implementer\t: 0x{self.midr >> 24 & 0xFF:02x}\n"
            "CPU architecture: 8\n"
            f"CPU variant\t: 0x{self.midr >> 20 & 0xF:x}\n"
            f"CPU part\t: 0x{self.midr >> 4 & 0xFFF:03x}\n"
            f"CPU revision\t: {self.midr & 0xF}\n\n"
        )
        return "".join(entry.format(i=i) for i in range(processors))


def check_cpus(sysroot: Sysroot, cpus: Sequence[str]) -> dict[str, EmulatedCPU]:
    """Each of ``cpus`` (a qemu model, optionally with properties: ``max,sme=off``) probed once; a
    ``UsageError`` naming the models qemu knows when one cannot be emulated."""
    from nafnet_edge.errors import UsageError

    known = qemu_cpu_models()
    probed = {}
    for cpu in dict.fromkeys(cpus):
        if cpu.split(",")[0] not in known:
            raise UsageError(f"qemu emulates no CPU {cpu.split(',')[0]}; --cpu takes one of {', '.join(known)}")
        try:
            probed[cpu] = probe_cpu(sysroot, cpu)
        except EmulationError as e:
            raise UsageError(f"--cpu {cpu}: {e}") from None
    return probed


def qemu_cpu_models() -> list[str]:
    """The CPU models this qemu emulates (``-cpu help``)."""
    try:
        text = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True, check=False).stdout
    except OSError as e:
        raise SysrootError(f"cannot run {QEMU}: {e.strerror or e}") from None
    return [line.split()[0] for line in text.splitlines()[1:] if line.strip()]


def probe_cpu(sysroot: Sysroot, model: str) -> EmulatedCPU:
    """Run ``cpu_probe`` on the emulated ``model``."""
    done = subprocess.run(
        [QEMU, "-cpu", model, str(sysroot.cpu_probe)], capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout).split())[-200:]
        raise EmulationError(f"qemu cannot run -cpu {model}: {message or f'exit code {done.returncode}'}")
    data = json.loads(done.stdout)
    names = sysroot.hwcap_names()
    features = [names["hwcap"].get(bit, f"hwcap{bit}") for bit in range(64) if data["hwcap"] >> bit & 1]
    features += [names["hwcap2"].get(bit, f"hwcap2_{bit}") for bit in range(64) if data["hwcap2"] >> bit & 1]
    return EmulatedCPU(model, data["hwcap"], data["hwcap2"], data["midr"], tuple(features))


@dataclass
class EmulatedRuntime:
    """A runner process under qemu: ``run`` maps one input tensor (the artifact's own dtype and layout) to its
    output; ``close`` ends the process."""

    process: subprocess.Popen[bytes]
    input: dict[str, Any]
    output: dict[str, Any]
    cpu: EmulatedCPU
    runner: str
    cpu_features: dict[str, bool] | None  # what the runtime's CPU detection read (ExecuTorch's cpuinfo), if known
    stderr: IO[bytes]
    calls: int = 0
    compute: str | None = None  # the arithmetic the runner reports (LiteRT: fp32 or fp16), when it says
    _closed: bool = field(default=False, repr=False)

    def run(self, x: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(x, dtype=self.input["dtype"])
        if list(data.shape) != self.input["shape"]:
            raise EmulationError(f"the emulated runtime takes {self.input['shape']}, not {list(data.shape)}")
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None  # both are pipes (Popen below)
        try:
            stdin.write(data.tobytes())
            stdin.flush()
        except BrokenPipeError:
            raise self._failure("stopped before taking a tile") from None
        raw = stdout.read(self.output["bytes"])
        if len(raw) != self.output["bytes"]:
            raise self._failure("stopped before returning a tile")
        self.calls += 1
        return np.frombuffer(raw, dtype=self.output["dtype"]).reshape(self.output["shape"]).copy()

    def _failure(self, what: str) -> EmulationError:
        code = self.process.wait()
        return EmulationError(
            f"the emulated {self.runner} on -cpu {self.cpu.model} {what} (exit {code}): " + self.tail()
        )

    def tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().decode(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-_STDERR_TAIL:] or "no message"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()  # end of input: the runner exits
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


@contextmanager
def emulated_runtime(
    sysroot: Sysroot, cpu: str, target: str, artifact: Path, *, fp16: bool = False
) -> Iterator[EmulatedRuntime]:
    """``artifact`` (a ``.pte`` for ``executorch``, a ``.tflite`` for ``litert``) loaded in its runtime on the
    emulated ``cpu``, a LiteRT file with float16 weights with XNNPACK's FP16 inference when ``fp16`` (as the host
    session runs it); the process ends with the block."""
    emulated = probe_cpu(sysroot, cpu)
    processors = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="nafnet-edge-arm64-") as tmp:
        prefix = Path(tmp) / "root"
        prefix.mkdir()
        for entry in sysroot.root.iterdir():
            (prefix / entry.name).symlink_to(entry.resolve())
        (prefix / "proc").mkdir()
        (prefix / "proc" / "cpuinfo").write_text(emulated.cpuinfo(processors))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
        if target == "executorch":
            command = [str(sysroot.et_runner), str(artifact)]
        elif target == "litert":
            from importlib import resources

            script = resources.files("nafnet_edge.arm64").joinpath("litert_runner.py")
            python = prefix / "usr" / "bin" / sysroot.python.name
            command = [str(python), str(script), str(artifact), str(processors), *(["fp16"] if fp16 else [])]
            env.update(PYTHONPATH=str(sysroot.site), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
        else:
            raise EmulationError(f"no ARM64 runner for --target {target}")
        stderr = open(Path(tmp) / "stderr", "w+b")  # noqa: SIM115 (closed by EmulatedRuntime.close)
        # a file, not a pipe: a chatty runtime can never block on it
        process = subprocess.Popen(
            [QEMU, "-L", str(prefix), "-cpu", cpu, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
        runtime = EmulatedRuntime(process, {}, {}, emulated, RUNNERS[target], None, stderr)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            try:
                ready = json.loads(line)
            except ValueError:
                raise runtime._failure("did not load the artifact") from None
            runtime.input, runtime.output = ready["input"], ready["output"]
            runtime.cpu_features = ready.get("cpu_features")
            runtime.compute = ready.get("compute")
            yield runtime
        finally:
            runtime.close()
