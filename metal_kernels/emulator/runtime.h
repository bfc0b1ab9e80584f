// Interface between the kernel-side compatibility header (metal_compat.h), the fibre
// scheduler (runtime.cpp) and Python (ctypes mirrors Buffer and Launch: keep the three in
// sync and bump STS_EMU_ABI when a layout changes).
//
// runtime.cpp is built once into a shared library that every kernel library links to, so a
// process has one scheduler and one pool of fibre stacks however many kernels it loads.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define STS_EMU_ABI 5
#define STS_EMU_API __attribute__((visibility("default")))

namespace sts_emu {

// One buffer argument of the kernel (an input, an output, or an input's shape/strides/ndim).
struct Buffer {
  void* data;
  int64_t nbytes;
  int64_t elem_size;
  const char* name;   // the parameter name, for error messages
  const char* space;  // "device" or "constant"
  const char* type;   // the MSL element type, e.g. "float16_t"
};

// One dispatch, filled in by Python.
struct Launch {
  int32_t nbufs;
  Buffer* bufs;
  uint32_t grid[3];  // in threads, as MLX's dispatch_threads
  uint32_t tg[3];    // requested threadgroup size (clamped to the grid per axis here)
  uint64_t seed;
  char* err;         // out: the first error, NUL-terminated
  int32_t err_cap;
  int32_t pad_;
  uint64_t err_pc;   // out: code offset (in the kernel library) of a failing buffer access, or 0
  uint64_t switches; // out: fibre switches, for the curious
};

// The Metal attribute values of one thread.
struct ThreadCtx {
  uint32_t pos_in_grid[3];
  uint32_t pos_in_tg[3];
  uint32_t tg_pos[3];
  uint32_t tgs_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t threads_per_tg[3];           // this threadgroup's size (smaller at the grid's edges)
  uint32_t dispatch_threads_per_tg[3];  // the size the dispatch asked for
  uint32_t index_in_tg;
  uint32_t simd_index;
  uint32_t simd_lane;
  uint32_t simds_per_tg;
  uint32_t dispatch_simds_per_tg;
  uint32_t quad_index;
  uint32_t quad_lane;
  uint32_t quads_per_tg;
  uint32_t dispatch_quads_per_tg;
};

// What the lanes of one simdgroup hand to a collective; filled in by the scheduler when
// the collective releases them. The first lane to resume computes every lane's result
// (the others are still suspended, so their in/out pointers, which point into their
// stacks, are valid) and sets `done`.
struct SimdSync {
  uint32_t mask;  // the lanes taking part: those of the simdgroup that wait at it
  bool done;
  const void* in[32];
  void* out[32];
  int32_t arg[32];
};

typedef void (*ThreadMain)(const Launch&, const ThreadCtx&);

// Runs the whole grid; returns 0, or 1 with Launch::err set.
STS_EMU_API int run(Launch* launch, ThreadMain main);

// Called from kernel code (through metal_compat.h), inside a fibre.
STS_EMU_API [[noreturn]] void fail(const char* message);
STS_EMU_API [[noreturn]] void fail_oob(const Buffer* buf, const void* addr, int64_t elem_size, int64_t align,
                          void* pc);
STS_EMU_API [[noreturn]] void fail_no_buffer(const void* addr, void* pc);
STS_EMU_API void threadgroup_barrier_wait(int site);  // site: line * 4096 + column
STS_EMU_API SimdSync* simd_sync(const char* what, int site, const void* in, void* out, int32_t arg);
STS_EMU_API void* threadgroup_slot(int key, size_t size, size_t align, const char* name);
STS_EMU_API int new_threadgroup_key();
STS_EMU_API const Buffer* find_buffer(const void* addr);  // the buffer holding addr (or ending at it)
STS_EMU_API const Buffer* buffer_arg(const Launch& launch, int index);

}  // namespace sts_emu
