// Fibre scheduler of the Metal emulator.
//
// Threadgroups run one after another (in a seeded random order). Inside a threadgroup every
// thread is a fibre with its own stack; the scheduler resumes a randomly chosen runnable
// fibre, which runs until it reaches a synchronisation point (threadgroup_barrier,
// simdgroup_barrier, a simd collective) or returns. So the interleaving between two
// barriers is random, and a kernel that reads threadgroup memory before the barrier that
// should order it reads the poison that memory starts with.
//
// Errors (an out-of-bounds access, a deadlock, a divergent collective, ...) are recorded and
// the fibre switches straight back to the scheduler, which abandons the run: nothing unwinds
// across a context switch, and kernel code holds no resources that would need unwinding.
#include "runtime.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__ELF__) && !defined(STS_EMU_UCONTEXT)
#define STS_EMU_ASM_SWITCH 1
#else
#define STS_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#if STS_EMU_ASM_SWITCH
// Saves the callee-saved registers, the x87 control word and MXCSR on the current stack,
// stores the stack pointer in *save_sp and resumes the stack new_sp (saved the same way).
// Unlike swapcontext it makes no system call (no signal mask), which is most of the cost.
extern "C" void sts_emu_switch(void** save_sp, void* new_sp);
asm(R"(
    .text
    .p2align 4
    .globl sts_emu_switch
    .hidden sts_emu_switch
    .type sts_emu_switch,@function
sts_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    fnstcw (%rsp)
    stmxcsr 8(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sts_emu_switch,.-sts_emu_switch
)");
#endif

namespace sts_emu {
namespace {

constexpr size_t kStackSize = 256 * 1024;  // per fibre, lazily committed by the kernel
constexpr int kMaxThreads = 1024;           // Metal's limit per threadgroup
constexpr int kMaxSimdgroups = kMaxThreads / 32;
constexpr size_t kMetalThreadgroupMemory = 32 * 1024;
constexpr size_t kGuard = 64;               // poisoned bytes around each threadgroup array
constexpr size_t kArenaSize = 256 * 1024;

enum class State : uint8_t { Runnable, TgWait, SimdWait, Done };

struct Fibre {
#if STS_EMU_ASM_SWITCH
  void* sp;
#else
  ucontext_t uc;
#endif
  char* stack;
  State state;
  int site;           // call site (line * 4096 + column) of the barrier / collective it waits at
  const char* what;   // SimdWait: the collective's name
  const void* in;
  void* out;
  int32_t arg;
  ThreadCtx ctx;
};

struct Slot {
  size_t offset;
  size_t size;
  const char* name;
};

struct Engine {
  Launch* launch = nullptr;
  ThreadMain main = nullptr;
  Fibre fibres[kMaxThreads];
  std::vector<char*> stacks;
  char* stack_region = nullptr;
  size_t stack_region_size = 0;
  int n = 0;  // threads in the current threadgroup
  std::vector<int> runnable;
  int live = 0, done = 0, at_barrier = 0;
  int simd_runnable[kMaxSimdgroups];
  SimdSync simd[kMaxSimdgroups];
  uint32_t tg_pos[3];
  // Threadgroup memory: slots by key, bump-allocated in the arena, fresh for each group.
  alignas(64) char arena[kArenaSize];
  size_t arena_used = 0, metal_bytes = 0;
  std::vector<Slot> slots;
  std::vector<int> slot_of_key;
  int keys = 0;
  Fibre* cur = nullptr;
#if STS_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  std::string error;
  uint64_t err_pc = 0;
  uint64_t rng = 0;
  uint64_t switches = 0;
};

Engine g;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

uint64_t next_random() {  // splitmix64
  uint64_t z = (g.rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string triple(const uint32_t v[3]) { return format("(%u,%u,%u)", v[0], v[1], v[2]); }

std::string thread_name(const Fibre* f) {
  return "thread_position_in_threadgroup " + triple(f->ctx.pos_in_tg) +
         " (thread_position_in_grid " + triple(f->ctx.pos_in_grid) + ") of threadgroup " +
         triple(f->ctx.tg_pos);
}

// "@S<site>@" is replaced by Python with the line and its text.
std::string site_text(int site) { return format("@S%d@", site); }

std::string lanes_text(uint32_t mask) {
  std::string s;
  for (int l = 0; l < 32;) {
    if (!(mask >> l & 1)) { l++; continue; }
    int e = l;
    while (e + 1 < 32 && (mask >> (e + 1) & 1)) e++;
    if (!s.empty()) s += ",";
    s += e == l ? format("%d", l) : format("%d-%d", l, e);
    l = e + 1;
  }
  return s;
}

void set_error(const std::string& message) {
  if (g.error.empty()) g.error = message;
}

// ---- context switching -------------------------------------------------------------------

void switch_to_scheduler() {
  Fibre* f = g.cur;
#if STS_EMU_ASM_SWITCH
  sts_emu_switch(&f->sp, g.sched_sp);
#else
  swapcontext(&f->uc, &g.sched_uc);
#endif
}

void switch_to(Fibre* f) {
  g.cur = f;
  g.switches++;
#if STS_EMU_ASM_SWITCH
  sts_emu_switch(&g.sched_sp, f->sp);
#else
  swapcontext(&g.sched_uc, &f->uc);
#endif
  g.cur = nullptr;
}

void fibre_body() {
  Fibre* f = g.cur;
  g.main(*g.launch, f->ctx);
  f->state = State::Done;
  switch_to_scheduler();
  abort();  // a finished fibre is never resumed
}

// All fibre stacks live in one reserved region, each with a guard page below it, so an
// overflow faults instead of corrupting its neighbour. The pages a run touches stay for the
// next run (one pool per process: every kernel library shares this runtime).
bool reserve_stacks() {
  if (g.stack_region) return true;
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t span = kStackSize + page;
  void* base = mmap(nullptr, span * kMaxThreads, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return false;
  for (int i = 0; i < kMaxThreads; i++) {
    char* guard = static_cast<char*>(base) + (size_t)i * span;
    mprotect(guard, page, PROT_NONE);
    g.stacks.push_back(guard + page);
  }
  g.stack_region = static_cast<char*>(base);
  g.stack_region_size = span * kMaxThreads;
  return true;
}

void prepare(Fibre* f) {
#if STS_EMU_ASM_SWITCH
  // The stack sts_emu_switch expects: FPU words, six registers, then the address it
  // "returns" to (fibre_body), above it a fake return address for fibre_body itself, placed
  // so that fibre_body starts with the stack alignment of a called function.
  uint64_t* sp = reinterpret_cast<uint64_t*>(f->stack + kStackSize);
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(&fibre_body);
  for (int i = 0; i < 6; i++) *--sp = 0;
  sp -= 2;
  uint32_t* fpu = reinterpret_cast<uint32_t*>(sp);
  fpu[0] = 0x037F;  // x87 control word: default
  fpu[1] = 0;
  fpu[2] = 0x1F80;  // MXCSR: exceptions masked, round to nearest, no flush-to-zero
  fpu[3] = 0;
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = kStackSize;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fibre_body, 0);
#endif
}

Fibre* current(const char* what) {
  if (!g.cur) {
    fprintf(stderr, "sts_emu: %s called outside a kernel thread\n", what);
    abort();
  }
  return g.cur;
}

// ---- synchronisation ---------------------------------------------------------------------

void make_runnable(Fibre* f, int index) {
  f->state = State::Runnable;
  g.runnable.push_back(index);
  g.simd_runnable[f->ctx.simd_index]++;
}

// When no lane of simdgroup s can run any more: release the collective its lanes wait at, or
// report that they wait at different ones. Lanes waiting at a threadgroup_barrier instead are
// left out, as a GPU leaves out the lanes of the other side of a branch: with
// `if (lane < 16) v = simd_sum(v); threadgroup_barrier(...);` the sum is over lanes 0-15.
void check_simdgroup(int s) {
  if (g.simd_runnable[s] > 0) return;
  int base = s * 32, count = g.n - base < 32 ? g.n - base : 32;
  uint32_t waiting = 0;
  for (int l = 0; l < count; l++)
    if (g.fibres[base + l].state == State::SimdWait) waiting |= 1u << l;
  if (!waiting) return;
  // Group the waiting lanes by where they wait.
  std::string groups;
  uint32_t seen = 0;
  int distinct = 0;
  for (int l = 0; l < count; l++) {
    if (!(waiting >> l & 1) || (seen >> l & 1)) continue;
    const Fibre& a = g.fibres[base + l];
    uint32_t same = 0;
    for (int m = l; m < count; m++) {
      const Fibre& b = g.fibres[base + m];
      if ((waiting >> m & 1) && b.site == a.site && strcmp(a.what, b.what) == 0) same |= 1u << m;
    }
    seen |= same;
    distinct++;
    groups += format("%slanes %s at %s (%s)", groups.empty() ? "" : ", ", lanes_text(same).c_str(),
                     a.what, site_text(a.site).c_str());
  }
  if (distinct > 1) {
    set_error(format("divergent simd collective in threadgroup %s, simdgroup %d: ",
                     triple(g.tg_pos).c_str(), s) +
              groups + "; the lanes of a simdgroup must reach the same collective together");
    return;
  }
  SimdSync& sync = g.simd[s];
  sync.mask = waiting;
  sync.done = false;
  for (int l = 0; l < count; l++) {
    if (!(waiting >> l & 1)) continue;
    Fibre* f = &g.fibres[base + l];
    sync.in[l] = f->in;
    sync.out[l] = f->out;
    sync.arg[l] = f->arg;
    make_runnable(f, base + l);
  }
}

// When no thread can run: release the threadgroup_barrier they all wait at, or report a
// deadlock.
void check_threadgroup_barrier() {
  std::string groups;
  int distinct = 0;
  std::vector<int> sites;
  for (int i = 0; i < g.n; i++) {
    const Fibre& f = g.fibres[i];
    if (f.state == State::Done) continue;
    int key = f.state == State::TgWait ? f.site : -1 - f.site;
    bool known = false;
    for (int k : sites) known = known || k == key;
    if (known) continue;
    sites.push_back(key);
    int count = 0;
    for (int j = 0; j < g.n; j++) {
      const Fibre& o = g.fibres[j];
      if (o.state == f.state && o.site == f.site) count++;
    }
    distinct++;
    groups += format("%s%d thread(s) at %s (%s), e.g. thread_position_in_threadgroup %s",
                     groups.empty() ? "" : "; ", count,
                     f.state == State::TgWait ? "threadgroup_barrier" : f.what,
                     site_text(f.site).c_str(), triple(f.ctx.pos_in_tg).c_str());
  }
  if (distinct != 1 || sites[0] < 0) {
    set_error("deadlock in threadgroup " + triple(g.tg_pos) +
              ": the threads wait at different barriers: " + groups);
    return;
  }
  g.at_barrier = 0;
  for (int i = 0; i < g.n; i++)
    if (g.fibres[i].state == State::TgWait) make_runnable(&g.fibres[i], i);
}

const Fibre* first_waiting() {
  for (int i = 0; i < g.n; i++)
    if (g.fibres[i].state == State::TgWait) return &g.fibres[i];
  return nullptr;
}

void after_yield(Fibre* f) {
  int s = f->ctx.simd_index;
  g.simd_runnable[s]--;
  if (f->state == State::Done) {
    g.live--;
    g.done++;
    if (g.at_barrier > 0) {
      const Fibre* w = first_waiting();
      set_error(thread_name(f) + " returned while " + format("%d", g.at_barrier) +
                " thread(s) of its threadgroup wait at threadgroup_barrier (" + site_text(w->site) +
                "): every thread of a threadgroup must reach each threadgroup_barrier");
      return;
    }
  } else if (f->state == State::TgWait) {
    g.at_barrier++;
    if (g.done > 0) {
      const Fibre* r = nullptr;
      for (int i = 0; i < g.n && !r; i++)
        if (g.fibres[i].state == State::Done) r = &g.fibres[i];
      set_error(thread_name(r) + " returned, but other threads of its threadgroup reach "
                "threadgroup_barrier (" + site_text(f->site) + "), e.g. " + thread_name(f) +
                ": every thread of a threadgroup must reach each threadgroup_barrier");
      return;
    }
  }
  check_simdgroup(s);
}

// ---- threadgroup memory ------------------------------------------------------------------

void reset_threadgroup_memory() {
  for (int& slot : g.slot_of_key) slot = -1;
  g.slots.clear();
  memset(g.arena, 0xFF, kGuard);  // a guard before the first array
  g.arena_used = kGuard;
  g.metal_bytes = 0;
}

bool guard_intact(size_t offset) {
  for (size_t i = 0; i < kGuard; i++)
    if (static_cast<unsigned char>(g.arena[offset + i]) != 0xFF) return false;
  return true;
}

// Writes just outside a threadgroup array land in the poisoned guards around it.
void check_guards() {
  for (size_t i = 0; i <= g.slots.size(); i++) {
    size_t off = i == 0 ? 0 : g.slots[i - 1].offset + g.slots[i - 1].size;
    if (guard_intact(off) || g.slots.empty()) continue;
    std::string where = i == 0 ? "before threadgroup array '" + std::string(g.slots[0].name) + "'"
                        : i == g.slots.size()
                            ? "after threadgroup array '" + std::string(g.slots[i - 1].name) + "'"
                            : "between threadgroup arrays '" + std::string(g.slots[i - 1].name) +
                                  "' and '" + g.slots[i].name + "'";
    set_error("out-of-bounds write to threadgroup memory in threadgroup " + triple(g.tg_pos) +
              ": the guard bytes " + where + " were overwritten");
    return;
  }
}

// ---- running -----------------------------------------------------------------------------

void run_group(const uint32_t tg[3], const uint32_t groups[3], const uint32_t gpos[3]) {
  const uint32_t* grid = g.launch->grid;
  uint32_t size[3];
  for (int a = 0; a < 3; a++) {
    uint32_t rest = grid[a] - gpos[a] * tg[a];
    size[a] = rest < tg[a] ? rest : tg[a];
    g.tg_pos[a] = gpos[a];
  }
  int n = (int)(size[0] * size[1] * size[2]);
  uint32_t nominal = tg[0] * tg[1] * tg[2];
  g.n = n;
  g.runnable.clear();
  g.live = n;
  g.done = 0;
  g.at_barrier = 0;
  for (int s = 0; s < kMaxSimdgroups; s++) g.simd_runnable[s] = 0;
  for (uint32_t z = 0; z < size[2]; z++)
    for (uint32_t y = 0; y < size[1]; y++)
      for (uint32_t x = 0; x < size[0]; x++) {
        int idx = (int)(x + y * size[0] + z * size[0] * size[1]);
        Fibre* f = &g.fibres[idx];
        ThreadCtx& c = f->ctx;
        const uint32_t local[3] = {x, y, z};
        for (int a = 0; a < 3; a++) {
          c.pos_in_tg[a] = local[a];
          c.tg_pos[a] = gpos[a];
          c.pos_in_grid[a] = gpos[a] * tg[a] + local[a];
          c.tgs_per_grid[a] = groups[a];
          c.threads_per_grid[a] = grid[a];
          c.threads_per_tg[a] = size[a];
          c.dispatch_threads_per_tg[a] = tg[a];
        }
        c.index_in_tg = (uint32_t)idx;
        c.simd_index = (uint32_t)idx / 32;
        c.simd_lane = (uint32_t)idx % 32;
        c.simds_per_tg = ((uint32_t)n + 31) / 32;
        c.dispatch_simds_per_tg = (nominal + 31) / 32;
        c.quad_index = (uint32_t)idx / 4;
        c.quad_lane = (uint32_t)idx % 4;
        c.quads_per_tg = ((uint32_t)n + 3) / 4;
        c.dispatch_quads_per_tg = (nominal + 3) / 4;
        f->stack = g.stacks[idx];
        f->site = 0;
        f->what = "";
        prepare(f);
        make_runnable(f, idx);
      }
  reset_threadgroup_memory();
  while (g.error.empty()) {
    if (g.runnable.empty()) {
      if (g.live == 0) break;
      check_threadgroup_barrier();
      continue;
    }
    size_t k = (size_t)(next_random() % g.runnable.size());
    int i = g.runnable[k];
    g.runnable[k] = g.runnable.back();
    g.runnable.pop_back();
    Fibre* f = &g.fibres[i];
    switch_to(f);
    if (!g.error.empty()) break;
    after_yield(f);
  }
  if (g.error.empty()) check_guards();
}

void run_grid(Launch* L) {
  uint32_t tg[3], groups[3];
  for (int a = 0; a < 3; a++) {
    if (L->grid[a] == 0) return;  // nothing to run, like an empty dispatch
    if (L->tg[a] == 0) {
      set_error("threadgroup size has a zero dimension");
      return;
    }
    tg[a] = L->tg[a] < L->grid[a] ? L->tg[a] : L->grid[a];
    groups[a] = (L->grid[a] + tg[a] - 1) / tg[a];
  }
  if ((uint64_t)tg[0] * tg[1] * tg[2] > (uint64_t)kMaxThreads) {
    set_error(format("threadgroup of %u x %u x %u threads exceeds Metal's %d", tg[0], tg[1], tg[2],
                     kMaxThreads));
    return;
  }
  if (!reserve_stacks()) {
    set_error("could not allocate fibre stacks");
    return;
  }
  uint64_t total = (uint64_t)groups[0] * groups[1] * groups[2];
  // Threadgroups run in a random order (Fisher-Yates), which a GPU does not promise either.
  std::vector<uint64_t> order;
  if (total <= (1u << 24)) {
    order.resize(total);
    for (uint64_t i = 0; i < total; i++) order[i] = i;
    for (uint64_t i = total; i > 1; i--) {
      uint64_t j = next_random() % i;
      uint64_t t = order[i - 1];
      order[i - 1] = order[j];
      order[j] = t;
    }
  }
  for (uint64_t k = 0; k < total && g.error.empty(); k++) {
    uint64_t i = order.empty() ? k : order[k];
    uint32_t gpos[3] = {(uint32_t)(i % groups[0]), (uint32_t)(i / groups[0] % groups[1]),
                        (uint32_t)(i / groups[0] / groups[1])};
    run_group(tg, groups, gpos);
  }
}

}  // namespace

// ---- the interface -----------------------------------------------------------------------

int run(Launch* L, ThreadMain main) {
  g.launch = L;
  g.main = main;
  g.error.clear();
  g.err_pc = 0;
  g.switches = 0;
  g.rng = L->seed * 0x2545F4914F6CDD1Dull + 0x1234567;
  run_grid(L);
  L->err_pc = g.err_pc;
  L->switches = g.switches;
  if (L->err && L->err_cap > 0) {
    snprintf(L->err, (size_t)L->err_cap, "%s", g.error.c_str());
  }
  g.launch = nullptr;
  return g.error.empty() ? 0 : 1;
}

void fail(const char* message) {
  Fibre* f = current("fail");
  set_error(std::string(message) + ", in " + thread_name(f));
  switch_to_scheduler();
  abort();
}

static void record_pc(void* pc) {
  Dl_info info;
  if (pc && dladdr(pc, &info) && info.dli_fbase)
    g.err_pc = (uint64_t)((char*)pc - (char*)info.dli_fbase);
}

void fail_oob(const Buffer* b, const void* addr, int64_t elem_size, int64_t align, void* pc) {
  Fibre* f = current("fail_oob");
  record_pc(pc);
  if (!b) {
    set_error("access through a device pointer that points into no buffer (null or not "
              "derived from a kernel argument), in " + thread_name(f));
    switch_to_scheduler();
    abort();
  }
  int64_t off = (int64_t)((const char*)addr - (const char*)b->data);
  int64_t elems = b->elem_size ? b->nbytes / b->elem_size : 0;
  std::string buffer = format("%s buffer '%s'", b->space, b->name);
  std::string extent = format("it has %lld elements (%s, %lld bytes)", (long long)elems, b->type,
                              (long long)b->nbytes);
  if (off >= 0 && off + elem_size <= b->nbytes) {
    // In bounds, so misaligned: e.g. a float4 read at an offset that is not a multiple of 16.
    set_error(format("misaligned access to %s: %lld bytes at byte offset %lld, which Metal "
                     "needs aligned to %lld bytes; ",
                     buffer.c_str(), (long long)elem_size, (long long)off, (long long)align) +
              extent + ", in " + thread_name(f));
  } else {
    std::string index = off % elem_size == 0
                            ? format("element index %lld", (long long)(off / elem_size))
                            : format("byte offset %lld", (long long)off);
    if (elem_size != b->elem_size)
      index += format(" (an access of %lld bytes at byte offset %lld)", (long long)elem_size,
                      (long long)off);
    set_error("out-of-bounds access to " + buffer + ": " + index + ", but " + extent + ", in " +
              thread_name(f));
  }
  switch_to_scheduler();
  abort();
}

void fail_no_buffer(const void* addr, void* pc) {
  Fibre* f = current("fail_no_buffer");
  record_pc(pc);
  set_error(format("a pointer (%p) that is in no kernel buffer was converted to a device pointer, in ",
                   addr) +
            thread_name(f));
  switch_to_scheduler();
  abort();
}

void threadgroup_barrier_wait(int site) {
  Fibre* f = current("threadgroup_barrier");
  f->state = State::TgWait;
  f->site = site;
  switch_to_scheduler();
}

SimdSync* simd_sync(const char* what, int site, const void* in, void* out, int32_t arg) {
  Fibre* f = current(what);
  f->state = State::SimdWait;
  f->what = what;
  f->site = site;
  f->in = in;
  f->out = out;
  f->arg = arg;
  switch_to_scheduler();
  return &g.simd[f->ctx.simd_index];
}

int new_threadgroup_key() { return g.keys++; }

void* threadgroup_slot(int key, size_t size, size_t align, const char* name) {
  if ((size_t)key >= g.slot_of_key.size()) g.slot_of_key.resize((size_t)key + 1, -1);
  int s = g.slot_of_key[(size_t)key];
  if (s >= 0) return g.arena + g.slots[(size_t)s].offset;
  if (align < 16) align = 16;
  size_t off = (g.arena_used + align - 1) / align * align;
  g.metal_bytes += size;
  if (g.metal_bytes > kMetalThreadgroupMemory)
    fail(format("threadgroup memory of %zu bytes (with '%s') exceeds Metal's %zu bytes",
                g.metal_bytes, name, kMetalThreadgroupMemory).c_str());
  if (off + size + kGuard > kArenaSize) fail("threadgroup memory arena exhausted");
  // The guard before this array is the gap after the previous one: poison it all.
  memset(g.arena + g.arena_used, 0xFF, off + size + kGuard - g.arena_used);
  g.arena_used = off + size + kGuard;
  g.slots.push_back(Slot{off, size, name});
  g.slot_of_key[(size_t)key] = (int)g.slots.size() - 1;
  return g.arena + off;
}

const Buffer* find_buffer(const void* addr) {
  const Launch* L = g.launch;
  if (!L) return nullptr;
  const char* p = static_cast<const char*>(addr);
  for (int pass = 0; pass < 2; pass++)
    for (int i = 0; i < L->nbufs; i++) {
      const char* b = static_cast<const char*>(L->bufs[i].data);
      const char* e = b + L->bufs[i].nbytes;
      if (pass == 0 ? (p >= b && p < e) : p == e) return &L->bufs[i];
    }
  return nullptr;
}

const Buffer* buffer_arg(const Launch& launch, int index) { return &launch.bufs[index]; }

}  // namespace sts_emu

extern "C" STS_EMU_API int sts_emu_abi_version() { return STS_EMU_ABI; }
