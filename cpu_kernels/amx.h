// What both CPU kernels need to use Intel's AMX tile units: whether the CPU has them, the kernel's
// permission to use them, and the tile configuration's layout.
#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace sts_edge_amx {

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// AVX-512 F, BW, VL and VNNI, AMX tiles and their int8 products; with `bf16` also AVX-512 BF16
// and AMX's bfloat16 products.
inline bool cpu_has_amx(bool bf16 = false) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool avx512 = (ebx >> 16 & 1) && (ebx >> 30 & 1) && (ebx >> 31 & 1) && (ecx >> 11 & 1);
  const bool amx = (edx >> 24 & 1) && (edx >> 25 & 1);
  if (!(avx512 && amx)) return false;
  if (!bf16) return true;
  unsigned eax1, ebx1, ecx1, edx1;
  if (!__get_cpuid_count(7, 1, &eax1, &ebx1, &ecx1, &edx1)) return false;
  return (edx >> 22 & 1) && (eax1 >> 5 & 1);  // AMX-BF16, AVX512_BF16
}

// Linux hands out the tile registers' 8 KB of state only to processes that ask for it once
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); the permission covers every thread.
inline bool tiles_permitted() {
  static const bool permitted = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return permitted;
}

}  // namespace sts_edge_amx
