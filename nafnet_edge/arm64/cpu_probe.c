/* The CPU probe nafnet-edge cross-compiles for ARM64 validation under emulation: prints, as one JSON line, the
 * HWCAP and HWCAP2 words of the auxiliary vector and MIDR_EL1 (read with MRS, which Linux, and qemu's user-mode
 * emulation, serve to user space when HWCAP_CPUID is set), so the emulated CPU can be described in the
 * /proc/cpuinfo a Linux kernel would show on it. */
#include <stdio.h>
#include <sys/auxv.h>

#ifndef HWCAP_CPUID
#define HWCAP_CPUID (1 << 11)
#endif

int main(void) {
  unsigned long hwcap = getauxval(AT_HWCAP), hwcap2 = getauxval(AT_HWCAP2), midr = 0;
  if (hwcap & HWCAP_CPUID) __asm__ volatile("mrs %0, MIDR_EL1" : "=r"(midr));
  printf("{\"hwcap\": %lu, \"hwcap2\": %lu, \"midr\": %lu, \"cpuid\": %s}\n", hwcap, hwcap2, midr,
         (hwcap & HWCAP_CPUID) ? "true" : "false");
  return 0;
}
