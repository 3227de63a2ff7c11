"""Android artifacts validated on ARM64 without a phone: the artifact runs in its own runtime on CPUs emulated by
qemu user-mode emulation (``qemu-aarch64-static``), in an aarch64 sysroot of Debian packages and PyPI wheels.

- :mod:`nafnet_edge.arm64.sysroot`: ``nafnet-edge arm64 prepare``, the one step that downloads (cached);
- :mod:`nafnet_edge.arm64.emulator`: a runtime process on an emulated CPU, fed tiles through a pipe;
- :mod:`nafnet_edge.arm64.validate`: ``nafnet-edge validate --arm64``, scored as on x86, recorded beside it.

Emulation shows what the ARM64 kernels compute (NEON, dot-product, i8mm code paths chosen by the runtime's CPU
detection), never how fast: no time measured under emulation is reported.
"""

from nafnet_edge.arm64.emulator import DEFAULT_CPUS
from nafnet_edge.arm64.sysroot import default_directory, prepare, require_sysroot, status_lines

__all__ = ["DEFAULT_CPUS", "default_directory", "prepare", "require_sysroot", "status_lines"]
