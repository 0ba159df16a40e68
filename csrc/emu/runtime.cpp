// The emulator runtime (see emu.h for the model). Compiled without instrumentation: the
// kernel translation units call the __tsan_* hooks at the bottom of this file for every load
// and store, and everything else through emu.h.
#include "emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <memory>
#include <unordered_map>

// The CUDA built-in variables. shim/cuda_runtime.h declares them const, so kernel code cannot
// assign them; only the scheduler writes them (defined non-const here: a const definition
// could be placed in read-only memory).
emu::Dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

// ------------------------------------------------------------------ context switch
// A thread switch saves the callee-saved registers on the old stack and swaps stack pointers
// (System V x86-64). ucontext's swapcontext also saves the signal mask with a system call:
// about 20x slower, and a warp collective costs 32 switches.
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch_stack
.type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch_stack, .-emu_switch_stack
)");

namespace emu {
namespace {

// Sets the built-ins for the thread about to run (they are const to everybody else).
void set_builtins(const Dim3& t, const Dim3& b) {
  ::threadIdx = t;
  ::blockIdx = b;
}

// ------------------------------------------------------------------ state of one launch

constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kGuardBytes = 64 * 1024;  // around each CTA's shared memory: hits are oob-shared
constexpr int kMaxBarriers = 16;           // bar.sync ids 0..15 (PTX 9.7.13.4)

enum class Wait { kNone, kBarrier, kCollective, kCluster, kMbarrier, kDone };

// One CTA's part of a vector clock, shared (immutable) between the threads that hold the same
// knowledge of that CTA: after a cluster barrier every thread of the cluster holds the same
// parts, so a cluster's clocks cost O(CTAs x threads) memory, not O(threads^2).
using Part = std::shared_ptr<const std::vector<uint32_t>>;

struct PendingCopy {
  uint32_t dst;
  const uint8_t* src;
  int cp_size, src_size;
  int group;  // -1 until committed
};
struct PendingWgmma {
  float* acc;
  std::vector<float> value;
  int group;
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  void* stack = nullptr;
  ThreadPos pos;
  struct Cta* cta = nullptr;
  Wait wait = Wait::kNone;
  const char* wait_what = "";
  int wait_id = 0;
  std::vector<uint32_t> vc;  // vector clock over the CTA's threads
  // What this thread knows of the other CTAs of its cluster: remote[r] is a clock over CTA
  // r's threads (null: nothing), acquired through cluster barriers and mbarriers (remote[own
  // rank] is unused: vc is that part).
  std::vector<Part> remote;
  int cl_arrived = -1;         // barrier.cluster phase this thread arrived in and has not waited for
  int cl_waited = -1;          // the last barrier.cluster phase it waited for
  uint32_t mbar_fences = 0;    // fence.mbarrier_init / fence.acq_rel.cluster executed so far
  std::vector<Part> woke_local, woke_cluster;  // the mbarrier phase clocks it was woken with
  uint32_t proxy_fences = 0;
  std::vector<PendingCopy> copies;
  int cp_groups = 0;  // committed cp.async groups so far
  std::vector<PendingWgmma> wgmmas;
  int wg_groups = 0;
  std::unordered_map<uintptr_t, uint32_t> pc_seen;  // dynamic instance per pc (counters)
};

struct ByteShadow {
  uint32_t wclk = 0, wfence = 0;
  uint16_t wtid = 0;
  uint8_t written = 0, pending = 0;
  uint16_t rtid[2] = {0, 0};
  uint32_t rclk[2] = {0, 0};
  uint8_t nreads = 0;
};

struct CollectiveState {
  const char* op = nullptr;
  std::vector<uint32_t> in, out;
  std::vector<uint32_t*> out_ptr;
  std::vector<char> joined;  // members that have arrived (out may be null for an op with no result)
  uint64_t arrived_lo = 0, arrived_hi = 0;  // up to 128 members
  int arrived = 0, n_in = 0, n_out = 0;
};

struct BarrierState {
  int arrived = 0, expected = 0;
  std::vector<Fiber*> waiting;
};

struct Access {
  uint32_t lane;
  uintptr_t addr;
  uint32_t size;
};

struct Cta {
  Dim3 block;
  unsigned rank = 0;
  int nthreads = 0;
  uint8_t* region = nullptr;  // guard | smem | guard
  uint8_t* smem = nullptr;
  size_t smem_size = 0;
  std::vector<ByteShadow> shadow;
  std::vector<Fiber*> fibers;
  int live = 0;  // threads that have not exited (DSMEM access to an exited CTA is reported)
  BarrierState bars[kMaxBarriers];
  // (scope, group index, member mask): a warp's disjoint member masks (sub-warp shuffles over
  // 16 lanes each, say) are independent collectives that may be in flight at once.
  std::map<std::tuple<int, int, uint32_t>, CollectiveState> collectives;
  std::unordered_map<uint64_t, std::vector<Access>> warp_requests[32];  // per warp (pc, instance)
};

struct Global {
  uintptr_t lo, hi;
  std::string name;
};

struct LoadRange {
  uintptr_t lo, hi;
};

struct State {
  bool in_launch = false;
  bool in_collective_fn = false;
  int live = 0;  // threads of the running cluster that have not exited
  int nthreads = 0;  // threads per CTA (cluster thread id = rank * nthreads + tid)
  std::map<std::string, size_t> static_sites;  // DSA_STATIC_SMEM objects of this launch: offset
  size_t static_end = 0;                       // end of the CTA shared window (dynamic + static)  // the emulator's own code of a collective: not kernel accesses
  bool aborted = false;
  LaunchSpec spec;
  Dim3 grid, block, cluster;
  std::vector<std::unique_ptr<Cta>> ctas;
  std::vector<std::unique_ptr<Fiber>> fibers;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<Global> globals;
  std::vector<LoadRange> images;  // the loaded libraries' own segments (constant tables)
  uintptr_t main_stack_lo = 0, main_stack_hi = 0;
  std::vector<Report> reports;
  std::map<std::string, int> report_counts;
  int report_limit = 20;
  std::vector<std::pair<std::string, Counters>> counters;
  Counters* cur_counters = nullptr;
  std::map<const void*, std::map<int, int>> attributes;
  std::vector<void*> stack_pool;
  std::vector<uint8_t*> region_pool;
} g;

void* get_stack() {
  if (!g.stack_pool.empty()) {
    void* s = g.stack_pool.back();
    g.stack_pool.pop_back();
    return s;
  }
  // A PROT_NONE page below each stack: a kernel whose locals overflow it faults at once
  // instead of corrupting the neighbouring thread's stack.
  constexpr size_t kPage = 4096;
  void* s = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (s == MAP_FAILED) {
    std::fprintf(stderr, "emu: out of memory for fiber stacks\n");
    std::abort();
  }
  mprotect(s, kPage, PROT_NONE);
  return static_cast<uint8_t*>(s) + kPage;
}

// "library+offset": tests/emulator.py turns it into function, file and line (addr2line).
std::string place(const void* pc) {
  Dl_info info;
  char buf[512];
  if (pc && dladdr(pc, &info) && info.dli_fname) {
    std::snprintf(buf, sizeof buf, "%s+0x%lx", info.dli_fname,
                  static_cast<unsigned long>(static_cast<const char*>(pc) - static_cast<const char*>(info.dli_fbase)));
  } else {
    std::snprintf(buf, sizeof buf, "%p", pc);
  }
  return buf;
}

std::string who(const Fiber* f) {
  char buf[160];
  if (!f) return "host";
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [tid %d]", f->pos.block.x, f->pos.block.y,
                f->pos.block.z, f->pos.thread.x, f->pos.thread.y, f->pos.thread.z, f->pos.tid);
  return buf;
}

void add_report(const char* kind, const std::string& text, const void* pc) {
  std::string key = std::string(kind) + "|" + g.spec.kernel;
  int& n = g.report_counts[key];
  ++n;
  if (n > g.report_limit) return;
  Report r;
  r.kind = kind;
  r.kernel = g.spec.kernel;
  r.text = text + (pc ? " at " + place(pc) : std::string());
  static const bool echo = std::getenv("DSA_EMU_ECHO") != nullptr;  // survives a crash
  if (echo) std::fprintf(stderr, "emu %s [%s]: %s\n", kind, g.spec.kernel, r.text.c_str());
  g.reports.push_back(std::move(r));
}

// ------------------------------------------------------------------ scheduling

void switch_to_scheduler() {
  Fiber* f = g.current;
  emu_switch_stack(&f->sp, g.scheduler_sp);
}

void block_current(Wait w, const char* what, int id) {
  Fiber* f = g.current;
  f->wait = w;
  f->wait_what = what;
  f->wait_id = id;
  switch_to_scheduler();
  if (g.aborted) switch_to_scheduler();  // never resumed again
}

void wake(Fiber* f) { f->wait = Wait::kNone; }

void cluster_exit(Fiber* f);

void fiber_entry() {
  g.body(g.ctx);
  g.current->wait = Wait::kDone;  // the scheduler completes barriers only exited threads block
  --g.live;
  --g.current->cta->live;
  cluster_exit(g.current);
  emu_switch_stack(&g.current->sp, g.scheduler_sp);  // never resumed
}

// ---- cluster vector clocks -------------------------------------------------------------
// Elementwise max of two parts; the result of a pair is memoised for the running cluster
// (thousands of threads acquiring the same phase merge the same pairs). The memo is keyed by
// the parts' addresses, so it keeps the two parts alive as well: a part freed during the run
// and a new one allocated at its address would otherwise hit the old pair's entry and get a
// stale clock (seen as a rare false race in a topk cluster test, depending on heap history).
struct MergeMemo {
  Part a, b, result;
};
std::map<std::pair<const void*, const void*>, MergeMemo> g_merge_memo;

Part merge(const Part& a, const Part& b) {
  if (!a || a == b) return b ? b : a;
  if (!b) return a;
  auto key = std::make_pair(static_cast<const void*>(a.get()), static_cast<const void*>(b.get()));
  auto it = g_merge_memo.find(key);
  if (it != g_merge_memo.end()) return it->second.result;
  std::vector<uint32_t> m(*a);
  bool from_b = false;
  for (size_t i = 0; i < m.size(); ++i)
    if ((*b)[i] > m[i]) m[i] = (*b)[i], from_b = true;
  Part r = !from_b ? a : (m == *b ? b : std::make_shared<const std::vector<uint32_t>>(std::move(m)));
  g_merge_memo.emplace(key, MergeMemo{a, b, r});
  return r;
}

// A clock being accumulated from releasing threads (an mbarrier or cluster-barrier phase).
struct ClockAcc {
  std::vector<std::vector<uint32_t>> own;  // [rank][tid]: the releasers' own parts (max)
  std::vector<Part> remote;                // [rank]: merged remote knowledge
  void join(const Fiber* f) {
    const size_t cs = f->remote.size();
    if (own.size() != cs) own.assign(cs, {}), remote.assign(cs, nullptr);
    auto& o = own[f->pos.cta_rank];
    if (o.empty()) o.assign(f->vc.size(), 0);
    for (size_t i = 0; i < o.size(); ++i) o[i] = std::max(o[i], f->vc[i]);
    for (size_t r = 0; r < cs; ++r)
      if (r != f->pos.cta_rank) remote[r] = merge(remote[r], f->remote[r]);
  }
  std::vector<Part> freeze() const {
    std::vector<Part> out(own.size());
    for (size_t r = 0; r < own.size(); ++r) {
      Part p = own[r].empty() ? nullptr : std::make_shared<const std::vector<uint32_t>>(own[r]);
      out[r] = merge(p, remote[r]);
    }
    return out;
  }
  bool empty() const { return own.empty(); }
};

// Acquire: f learns every part of `c` (only its own CTA's part with own_only).
void acquire(Fiber* f, const std::vector<Part>& c, bool own_only = false) {
  for (size_t r = 0; r < c.size(); ++r) {
    if (!c[r]) continue;
    if (r == f->pos.cta_rank) {
      for (size_t i = 0; i < f->vc.size(); ++i) f->vc[i] = std::max(f->vc[i], (*c[r])[i]);
    } else if (!own_only) {
      f->remote[r] = merge(f->remote[r], c[r]);
    }
  }
}

// After a release: the thread's later accesses are not covered by what it released.
inline void new_epoch(Fiber* f) { ++f->vc[f->pos.tid]; }

// Joins the vector clocks of `members` (one CTA's threads at a bar.sync / syncwarp: their own
// parts and their knowledge of the other CTAs) and starts a new epoch for each.
void join_clocks(const std::vector<Fiber*>& members) {
  if (members.empty()) return;
  const size_t n = members[0]->vc.size();
  std::vector<uint32_t> j(n, 0);
  for (Fiber* m : members)
    for (size_t i = 0; i < n; ++i) j[i] = std::max(j[i], m->vc[i]);
  const size_t cs = members[0]->remote.size();
  std::vector<Part> rj(cs);
  for (size_t r = 0; r < cs; ++r)
    for (Fiber* m : members) rj[r] = merge(rj[r], m->remote[r]);
  for (Fiber* m : members) {
    m->vc = j;
    m->remote = rj;
    ++m->vc[m->pos.tid];
  }
}

int live_threads(const Cta* c) {
  int n = 0;
  for (const Fiber* f : c->fibers) n += f->wait != Wait::kDone;
  return n;
}

void flush_counters(Cta* c);

bool release_barrier(Cta* c, int id) {
  BarrierState& b = c->bars[id];
  const int need = b.expected ? b.expected : live_threads(c);
  if (b.arrived < need || b.arrived == 0) return false;
  if (!b.expected && b.arrived < c->nthreads) {
    // CUDA: __syncthreads in conditional code must be reached by the whole block; threads
    // that exited never arrive (hardware happens to release; the program is still wrong).
    add_report("barrier-deadlock", "CTA-wide barrier " + std::to_string(id) + " completed by " + std::to_string(b.arrived) +
                                       " of " + std::to_string(c->nthreads) + " threads: the others exited without reaching it",
               nullptr);
  }
  join_clocks(b.waiting);
  for (Fiber* f : b.waiting) wake(f);
  b.waiting.clear();
  b.arrived = 0;
  b.expected = 0;
  if (g.cur_counters) ++g.cur_counters->barriers;
  flush_counters(c);
  return true;
}

// barrier.cluster (PTX 9.7.13.4 "barrier.cluster"): a phase completes when every thread of
// the cluster that has not exited has arrived; arrive has .release semantics (unless .relaxed),
// wait .acquire, at cluster scope: a waiter learns the clocks of every releasing arriver.
struct ClusterBarrier {
  int phase = 0, arrived = 0;
  ClockAcc acc;
  std::vector<Part> done;  // the clock of the last completed phase
  std::vector<Fiber*> waiting;
} g_cbar;

bool release_cluster() {
  if (g_cbar.arrived == 0 || g_cbar.arrived < g.live) return false;
  g_cbar.done = g_cbar.acc.freeze();
  g_cbar.acc = ClockAcc{};
  ++g_cbar.phase;
  g_cbar.arrived = 0;
  for (auto& c : g.ctas) flush_counters(c.get());
  for (Fiber* f : g_cbar.waiting) wake(f);
  g_cbar.waiting.clear();
  if (g.cur_counters) ++g.cur_counters->barriers, ++g.cur_counters->cluster_barriers;
  return true;
}

// mbarrier objects (PTX 9.7.13.15 "mbarrier"), keyed by (owning CTA rank, shared offset).
// Clocks: arrivals (and st.async completions) by threads of the owning CTA feed `local`, those
// by other CTAs' threads at .cluster scope feed `cluster` (a .cta-scope release by another
// CTA's thread orders nothing for the owner's waiters); a waiter acquires the completed
// phase's local clock, plus its cluster clock when its acquire is at .cluster scope.
struct Mbarrier {
  unsigned owner = 0;
  uint32_t off = 0;
  int expected = 0, pending = 0, phase = 0;
  int64_t tx = 0;
  int init_ct = 0;           // the initialising thread (cluster thread id), its clock then, and
  uint32_t init_clk = 0;     // its fence count then: a remote use needs a fence.mbarrier_init
  uint32_t init_fences = 0;  // (or fence.acq_rel.cluster) by it after the init
  int vis_phase = -1;        // barrier.cluster phase the initialiser arrived in after that fence:
                             // threads that waited for it see the init (the CUTLASS pattern
                             // fence.mbarrier_init + barrier.cluster.arrive.relaxed + wait)
  ClockAcc local, cluster;
  std::vector<Part> done_local, done_cluster;  // the clocks of the last completed phase
  std::vector<Fiber*> waiting;
};
std::map<std::pair<unsigned, uint32_t>, Mbarrier> g_mbars;
constexpr int64_t kMaxTx = (1 << 20) - 1;  // tx-count range [-(2^20-1), 2^20-1] (PTX 9.7.13.15.1)

std::string mbar_name(const Mbarrier& m) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "mbarrier at shared 0x%x of cta %u", m.off, m.owner);
  return buf;
}

// Completes the current phase once no arrival and no transaction byte is pending.
void mbar_try_complete(Mbarrier& m, const void* pc) {
  if (m.pending > 0) return;
  if (m.tx < 0) {
    add_report("mbarrier", mbar_name(m) + ": the last expected arrival came with tx-count " + std::to_string(m.tx) +
                               ": more bytes completed (complete_tx / st.async) than expect_tx announced",
               pc);
    return;  // the phase cannot complete on the device either
  }
  if (m.tx > 0) return;
  const std::vector<Part> lc = m.local.freeze(), cc = m.cluster.freeze();
  m.local = ClockAcc{};
  m.cluster = ClockAcc{};
  m.done_local = lc;
  m.done_cluster = cc;
  ++m.phase;
  if (g.cur_counters) ++g.cur_counters->mbarrier_phases;
  m.pending = m.expected;
  m.tx = 0;
  for (Fiber* f : m.waiting) {
    f->woke_local = lc;
    f->woke_cluster = cc;
    wake(f);
  }
  m.waiting.clear();
}

void mbar_release(Mbarrier& m, Fiber* f, bool release, bool cluster_scope) {
  if (!release) return;
  if (f->pos.cta_rank == m.owner) m.local.join(f);
  else if (cluster_scope) m.cluster.join(f);
  new_epoch(f);
}

void reset_cluster_state() {
  g_cbar = ClusterBarrier{};
  g_mbars.clear();
  g_merge_memo.clear();
}

void cluster_exit(Fiber* f) {
  if (f->cl_arrived == g_cbar.phase) --g_cbar.arrived;  // counted in live no more
  f->cl_arrived = -1;
}

void report_deadlock() {
  std::string text = "no thread can make progress;";
  std::map<std::string, int> waits;
  for (auto& f : g.fibers) {
    if (f->wait == Wait::kDone) continue;
    char buf[128];
    std::snprintf(buf, sizeof buf, " %s %d (cta %u)", f->wait_what, f->wait_id, f->cta->rank);
    ++waits[buf];
  }
  for (auto& [w, n] : waits) text += w + " x" + std::to_string(n) + ";";
  for (auto& [key, m] : g_mbars)
    if (!m.waiting.empty())
      text += " " + mbar_name(m) + " phase " + std::to_string(m.phase) + ": " + std::to_string(m.pending) + " of " +
              std::to_string(m.expected) + " arrivals pending, tx-count " + std::to_string(m.tx) + ";";
  if (g_cbar.arrived)
    text += " barrier.cluster: " + std::to_string(g_cbar.arrived) + " of " + std::to_string(g.live) + " live threads arrived;";
  for (auto& c : g.ctas)
    for (int id = 0; id < kMaxBarriers; ++id)
      if (c->bars[id].arrived)
        text += " barrier " + std::to_string(id) + ": " + std::to_string(c->bars[id].arrived) + " arrived of " +
                std::to_string(c->bars[id].expected ? c->bars[id].expected : live_threads(c.get())) + ";";
  add_report("barrier-deadlock", text, nullptr);
}

// Runs the fibers of one cluster until all are done or nothing can progress.
void run_cluster() {
  bool progress = true;
  while (true) {
    bool all_done = true;
    progress = false;
    for (auto& fp : g.fibers) {
      Fiber* f = fp.get();
      if (f->wait == Wait::kDone) continue;
      all_done = false;
      if (f->wait != Wait::kNone) continue;
      g.current = f;
      set_builtins(f->pos.thread, f->pos.block);
      emu_switch_stack(&g.scheduler_sp, f->sp);
      g.current = nullptr;
      progress = true;
      if (g.aborted) return;
    }
    if (all_done) return;
    // Threads that exited may complete CTA-wide barriers the others wait on.
    for (auto& c : g.ctas)
      for (int id = 0; id < kMaxBarriers; ++id)
        if (c->bars[id].arrived && release_barrier(c.get(), id)) progress = true;
    if (release_cluster()) progress = true;
    if (!progress) {
      report_deadlock();
      return;
    }
  }
}

Fiber* cur() { return g.current; }

// ------------------------------------------------------------------ shadow memory

bool in_region(const Cta* c, uintptr_t a, size_t n) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(c->smem);
  return a >= lo && a + n <= lo + c->smem_size;
}

// Happens-before: does thread f know about cluster thread ct's clock value clk?
inline bool ordered(const Fiber* f, int ct, uint32_t clk) {
  const unsigned r = static_cast<unsigned>(ct / g.nthreads);
  const int t = ct % g.nthreads;
  if (r == f->pos.cta_rank) return f->vc[t] >= clk;
  const Part& p = f->remote[r];
  return p && (*p)[t] >= clk;
}

// A cluster thread id as reports name it: "tid N" (of "cta R" in clusters of several CTAs).
std::string tid_name(int ct) {
  if (g.ctas.size() <= 1) return "tid " + std::to_string(ct);
  return "tid " + std::to_string(ct % g.nthreads) + " of cta " + std::to_string(ct / g.nthreads);
}

// " of cta R" when the byte is in a cluster peer's shared memory (DSMEM), else "".
std::string where(const Cta* c, const Fiber* f) {
  return c == f->cta ? std::string() : " of cta " + std::to_string(c->rank) + " (distributed shared memory)";
}

void shadow_access(Cta* c, Fiber* f, size_t off, size_t n, bool write, bool async_read, const void* pc) {
  bool uninit_reported = false;
  for (size_t i = 0; i < n; ++i) {
    ByteShadow& s = c->shadow[off + i];
    const int t = f->pos.cluster_tid;  // identity; the clock is f->vc[f->pos.tid]
    if (s.pending) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "%s of shared byte 0x%zx by %s while a cp.async to it is outstanding (no wait_group covers it)",
                    write ? "write" : "read", off + i, who(f).c_str());
      add_report("pending-cp-async", buf, pc);
      return;
    }
    if (s.written && s.wtid != t && !ordered(f, s.wtid, s.wclk)) {
      char buf[240];
      std::snprintf(buf, sizeof buf, "%s of shared byte 0x%zx%s by %s races with a write by %s (no barrier between)",
                    write ? "write" : "read", off + i, where(c, f).c_str(), who(f).c_str(), tid_name(s.wtid).c_str());
      add_report("race", buf, pc);
      return;
    }
    if (!write) {
      if (!s.written) {
        char buf[200];
        std::snprintf(buf, sizeof buf, "read of never-written shared byte 0x%zx%s by %s", off + i, where(c, f).c_str(),
                      who(f).c_str());
        if (!uninit_reported) add_report("uninit-shared", buf, pc);
        uninit_reported = true;  // one report per access; the read is still recorded below
      }
      if (s.written && async_read && s.wfence == g.fibers[s.wtid]->proxy_fences + 1) {
        char buf[240];
        std::snprintf(buf, sizeof buf,
                      "wgmma (async proxy) read of shared byte 0x%zx written by %s through the generic proxy with no fence.proxy.async after the write",
                      off + i, tid_name(s.wtid).c_str());
        add_report("proxy-fence", buf, pc);
        return;
      }
      const uint32_t clk = f->vc[f->pos.tid];
      int slot = -1;
      for (int r = 0; r < s.nreads; ++r)
        if (s.rtid[r] == t || ordered(f, s.rtid[r], s.rclk[r])) { slot = r; break; }
      if (slot < 0) slot = s.nreads < 2 ? s.nreads++ : 0;  // two concurrent readers kept (approximate)
      s.rtid[slot] = static_cast<uint16_t>(t);
      s.rclk[slot] = clk;
    } else {
      for (int r = 0; r < s.nreads; ++r)
        if (s.rtid[r] != t && !ordered(f, s.rtid[r], s.rclk[r])) {
          char buf[240];
          std::snprintf(buf, sizeof buf, "write of shared byte 0x%zx%s by %s races with a read by %s (no barrier between)",
                        off + i, where(c, f).c_str(), who(f).c_str(), tid_name(s.rtid[r]).c_str());
          add_report("race", buf, pc);
          return;
        }
      s.written = 1;
      s.wtid = static_cast<uint16_t>(t);
      s.wclk = f->vc[f->pos.tid];
      s.wfence = f->proxy_fences + 1;
      s.nreads = 0;
    }
  }
}

// Warp-level grouping for the counters: the k-th execution of one pc by the lanes of a warp is
// one instruction (a request).
void count_access(Fiber* f, uintptr_t pc, uintptr_t addr, uint32_t size) {
  Cta* c = f->cta;
  const uint32_t k = f->pc_seen[pc]++;
  const uint64_t key = (static_cast<uint64_t>(pc) << 16) ^ k;
  c->warp_requests[f->pos.tid / 32 % 32][key].push_back({static_cast<uint32_t>(f->pos.tid % 32), addr, size});
}

void flush_counters(Cta* c) {
  Counters* k = g.cur_counters;
  for (auto& wr : c->warp_requests) {
    for (auto& [key, acc] : wr) {
      if (!k) continue;
      const Access& a0 = acc[0];
      const bool shared = c->smem && a0.addr >= reinterpret_cast<uintptr_t>(c->smem) &&
                          a0.addr < reinterpret_cast<uintptr_t>(c->smem) + c->smem_size + kGuardBytes;
      if (shared) {
        // 32 banks of 4 bytes; a wavefront serves one distinct 4-byte word per bank.
        std::map<uint32_t, std::vector<uintptr_t>> bank_words;
        size_t bytes = 0;
        for (const Access& a : acc) {
          bytes += a.size;
          for (uintptr_t w = a.addr / 4; w <= (a.addr + a.size - 1) / 4; ++w) {
            auto& v = bank_words[w % 32];
            if (std::find(v.begin(), v.end(), w) == v.end()) v.push_back(w);
          }
        }
        size_t wf = 1;
        for (auto& [b, v] : bank_words) wf = std::max(wf, v.size());
        wf = std::max(wf, (bytes + 127) / 128);
        ++k->smem_requests;
        k->smem_wavefronts += wf;
      } else {
        std::vector<uintptr_t> sectors;
        for (const Access& a : acc)
          for (uintptr_t s = a.addr / 32; s <= (a.addr + a.size - 1) / 32; ++s) sectors.push_back(s);
        std::sort(sectors.begin(), sectors.end());
        ++k->gmem_requests;
        k->gmem_sectors += std::unique(sectors.begin(), sectors.end()) - sectors.begin();
      }
    }
    wr.clear();
  }
}

const Global* find_global(uintptr_t a, size_t n) {
  for (const Global& gl : g.globals)
    if (a >= gl.lo && a + n <= gl.hi) return &gl;
  return nullptr;
}

bool in_image(uintptr_t a) {
  for (const LoadRange& r : g.images)
    if (a >= r.lo && a < r.hi) return true;
  return false;
}

// Grows a CTA's shared window to `end` bytes (static objects after the dynamic region).
void extend_window(Cta* c, size_t end) {
  if (end <= c->smem_size) return;
  std::memset(c->smem + c->smem_size, 0xA5, end - c->smem_size);
  c->smem_size = end;
  c->shadow.resize(end);
}

// Ends the running launch from inside a thread: no thread resumes; launch() returns an error.
void abort_launch() {
  g.aborted = true;
  switch_to_scheduler();
  std::abort();  // unreachable: an aborted thread is never resumed
}

// Every plain load/store of the kernel TUs lands here.
void on_access(void* p, size_t n, bool write, const void* pc) {
  if (!g.in_launch || !g.current || g.in_collective_fn) return;
  Fiber* f = g.current;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t slo = reinterpret_cast<uintptr_t>(f->stack);
  if (a >= slo && a < slo + kStackBytes) {
    for (const PendingWgmma& w : f->wgmmas) {
      const uintptr_t lo = reinterpret_cast<uintptr_t>(w.acc), hi = lo + 4 * w.value.size();
      if (a < hi && a + n > lo) {
        add_report("pending-wgmma",
                   std::string(write ? "write" : "read") + " of a wgmma accumulator before the wgmma.wait_group that retires it, by " + who(f),
                   pc);
        break;
      }
    }
    return;
  }
  Cta* c = f->cta;
  const uintptr_t sm = reinterpret_cast<uintptr_t>(c->smem);
  if (a + n > sm - kGuardBytes && a < sm + c->smem_size + kGuardBytes) {
    if (a < sm || a + n > sm + c->smem_size) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "%s of %zu bytes at shared offset %ld by %s: outside the %zu bytes of dynamic shared memory",
                    write ? "write" : "read", n, static_cast<long>(a - sm), who(f).c_str(), c->smem_size);
      add_report("oob-shared", buf, pc);
      return;
    }
    shadow_access(c, f, a - sm, n, write, false, pc);
    count_access(f, reinterpret_cast<uintptr_t>(pc), a, static_cast<uint32_t>(n));
    return;
  }
  for (auto& other : g.ctas)  // distributed shared memory of a cluster peer
    if (other.get() != c && in_region(other.get(), a, n)) {
      if (other->live == 0) {
        char buf[200];
        std::snprintf(buf, sizeof buf, "%s of %zu bytes of cta %u's shared memory by %s after every thread of that CTA exited",
                      write ? "write" : "read", n, other->rank, who(f).c_str());
        add_report("dsmem-exited", buf, pc);
      }
      // Races, never-written bytes: checked against the peer's shadow with f's cluster clock.
      shadow_access(other.get(), f, a - reinterpret_cast<uintptr_t>(other->smem), n, write, false, pc);
      count_access(f, reinterpret_cast<uintptr_t>(pc), a, static_cast<uint32_t>(n));
      return;
    }
  if (find_global(a, n)) {
    if (g.cur_counters) (write ? g.cur_counters->gmem_bytes_written : g.cur_counters->gmem_bytes_read) += n;
    count_access(f, reinterpret_cast<uintptr_t>(pc), a, static_cast<uint32_t>(n));
    return;
  }
  if (a >= g.main_stack_lo && a < g.main_stack_hi) return;  // kernel arguments being evaluated
  if (!write && in_image(a)) return;                      // constant tables of the kernel image
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s of %zu bytes at %p by %s: not inside any device buffer of this launch",
                write ? "write" : "read", n, p, who(f).c_str());
  add_report("oob-global", buf, pc);
  // The access itself would touch memory nobody owns (and may fault, losing every report):
  // like a device fault, the launch ends here.
  abort_launch();
}

int image_cb(dl_phdr_info* info, size_t, void*) {
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    g.images.push_back({lo, lo + ph.p_memsz});
  }
  return 0;
}

void init_once() {
  static bool done = false;
  if (done) return;
  done = true;
  dl_iterate_phdr(image_cb, nullptr);
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* lo;
    size_t sz;
    pthread_attr_getstack(&attr, &lo, &sz);
    g.main_stack_lo = reinterpret_cast<uintptr_t>(lo);
    g.main_stack_hi = g.main_stack_lo + sz;
    pthread_attr_destroy(&attr);
  }
}

Counters& counters_for(const char* name) {
  for (auto& [n, c] : g.counters)
    if (n == name) return c;
  g.counters.emplace_back(name, Counters{});
  return g.counters.back().second;
}

}  // namespace

// ------------------------------------------------------------------ launch

const char* kernel_name(const void* kernel, const char* fallback) {
  static std::map<const void*, std::string> names;
  auto it = names.find(kernel);
  if (it != names.end()) return it->second.c_str();
  std::string name = fallback;
  Dl_info info;
  if (kernel && dladdr(kernel, &info) && info.dli_sname && info.dli_saddr == kernel) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (d && status == 0) name = d;
    std::free(d);
  }
  return names.emplace(kernel, name).first->second.c_str();
}

void set_kernel_attribute(const void* kernel, int attribute, int value) { g.attributes[kernel][attribute] = value; }
int kernel_attribute(const void* kernel, int attribute) {
  auto it = g.attributes.find(kernel);
  if (it == g.attributes.end()) return -1;
  auto jt = it->second.find(attribute);
  return jt == it->second.end() ? -1 : jt->second;
}

int launch(const LaunchSpec& spec, void (*body)(void*), void* ctx) {
  init_once();
  const unsigned nthreads = spec.block.x * spec.block.y * spec.block.z;
  const unsigned csz = spec.cluster.x * spec.cluster.y * spec.cluster.z;
  g.spec = spec;
  if (nthreads == 0 || nthreads > 1024 || spec.grid.x == 0 || spec.grid.y == 0 || spec.grid.z == 0 ||
      spec.dynamic_smem > kMaxDynamicSmem || csz == 0 || csz > 16 || spec.grid.x % spec.cluster.x ||
      spec.grid.y % spec.cluster.y || spec.grid.z % spec.cluster.z || spec.grid.y > 65535 || spec.grid.z > 65535) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "invalid launch: grid (%u,%u,%u) block (%u,%u,%u) cluster (%u,%u,%u) smem %zu",
                  spec.grid.x, spec.grid.y, spec.grid.z, spec.block.x, spec.block.y, spec.block.z, spec.cluster.x,
                  spec.cluster.y, spec.cluster.z, spec.dynamic_smem);
    add_report("bad-launch", buf, nullptr);
    return 1;  // cudaErrorInvalidValue
  }
  Counters& k = counters_for(spec.kernel);
  ++k.launches;
  g.cur_counters = &k;
  g.grid = spec.grid;
  g.block = spec.block;
  ::blockDim = spec.block;
  ::gridDim = spec.grid;
  g.cluster = spec.cluster;
  g.body = body;
  g.ctx = ctx;
  g.in_launch = true;
  g.aborted = false;
  const size_t smem = spec.dynamic_smem;
  g.static_sites.clear();
  g.static_end = (smem + 15) / 16 * 16;
  for (unsigned cz = 0; cz < spec.grid.z; cz += spec.cluster.z)
    for (unsigned cy = 0; cy < spec.grid.y; cy += spec.cluster.y)
      for (unsigned cx = 0; cx < spec.grid.x; cx += spec.cluster.x) {
        g.ctas.clear();
        g.fibers.clear();
        reset_cluster_state();
        unsigned rank = 0;
        for (unsigned z = 0; z < spec.cluster.z; ++z)
          for (unsigned y = 0; y < spec.cluster.y; ++y)
            for (unsigned x = 0; x < spec.cluster.x; ++x, ++rank) {
              auto c = std::make_unique<Cta>();
              c->block = {cx + x, cy + y, cz + z};
              c->rank = rank;
              c->nthreads = static_cast<int>(nthreads);
              c->live = static_cast<int>(nthreads);
              if (!g.region_pool.empty()) {
                c->region = g.region_pool.back();
                g.region_pool.pop_back();
              } else {
                c->region = static_cast<uint8_t*>(std::aligned_alloc(1024, kMaxDynamicSmem + 2 * kGuardBytes));
              }
              c->smem = c->region + kGuardBytes;
              c->smem_size = smem;
              std::memset(c->smem, 0xA5, smem);  // garbage, as uninitialised shared memory is
              c->shadow.assign(smem, ByteShadow{});
              extend_window(c.get(), g.static_sites.empty() ? smem : g.static_end);
              g.ctas.push_back(std::move(c));
            }
        k.ctas += g.ctas.size();
        g.live = static_cast<int>(g.ctas.size() * nthreads);
        g.nthreads = static_cast<int>(nthreads);
        for (auto& c : g.ctas) {
          for (unsigned t = 0; t < nthreads; ++t) {
            auto f = std::make_unique<Fiber>();
            f->cta = c.get();
            f->pos.block = c->block;
            f->pos.thread = {t % spec.block.x, t / spec.block.x % spec.block.y, t / (spec.block.x * spec.block.y)};
            f->pos.tid = static_cast<int>(t);
            f->pos.cta_rank = c->rank;
            f->pos.cluster_tid = static_cast<int>(c->rank * nthreads + t);
            f->vc.assign(nthreads, 0);
            f->vc[t] = 1;
            f->remote.assign(g.ctas.size(), nullptr);
            f->stack = get_stack();
            // First switch-in "returns" into fiber_entry with the stack aligned as after a call.
            void** top = reinterpret_cast<void**>(static_cast<uint8_t*>(f->stack) + kStackBytes);
            *--top = nullptr;  // fiber_entry's return address: it never returns
            *--top = reinterpret_cast<void*>(&fiber_entry);
            for (int r = 0; r < 6; ++r) *--top = nullptr;  // rbp rbx r12..r15
            f->sp = top;
            c->fibers.push_back(f.get());
            g.fibers.push_back(std::move(f));
            ++k.threads;
          }
        }
        run_cluster();
        for (auto& c : g.ctas) {
          flush_counters(c.get());
          for (Fiber* f : c->fibers)
            if (f->wait == Wait::kDone && (!f->copies.empty() || !f->wgmmas.empty()))
              add_report(f->copies.empty() ? "pending-wgmma" : "pending-cp-async",
                         who(f) + " exited with asynchronous operations never waited for", nullptr);
          g.region_pool.push_back(c->region);
        }
        for (auto& f : g.fibers) g.stack_pool.push_back(f->stack);
        g.fibers.clear();
        g.ctas.clear();
        if (g.aborted) goto done;
      }
done:
  g.in_launch = false;
  g.current = nullptr;
  g.cur_counters = nullptr;
  return g.aborted ? 719 : 0;  // cudaErrorLaunchFailure after a trap
}

void register_global(const void* base, size_t bytes, const char* name) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(base);
  g.globals.push_back({lo, lo + bytes, name ? name : "?"});
}
void clear_globals() { g.globals.clear(); }

const std::vector<Report>& reports() { return g.reports; }
void clear_reports() {
  g.reports.clear();
  g.report_counts.clear();
}
void set_report_limit(int n) { g.report_limit = n; }

std::vector<std::pair<std::string, Counters>> counters() { return g.counters; }
void clear_counters() { g.counters.clear(); }

// ------------------------------------------------------------------ thread identity

ThreadPos self() { return g.current ? g.current->pos : ThreadPos{}; }
Dim3 block_dim() { return g.block; }
Dim3 grid_dim() { return g.grid; }
Dim3 cluster_dim() { return g.cluster; }

uint8_t* dynamic_smem() { return g.current ? g.current->cta->smem : nullptr; }

uint8_t* static_smem(size_t bytes, size_t align, const char* site) {
  Fiber* f = cur();
  auto it = g.static_sites.find(site);
  if (it == g.static_sites.end()) {
    const size_t off = (g.static_end + align - 1) / align * align;
    if (off + bytes > kMaxDynamicSmem) {
      add_report("bad-launch", std::string("static shared object at ") + site + " exceeds the CTA's shared memory", nullptr);
      abort_launch();
    }
    it = g.static_sites.emplace(site, off).first;
    g.static_end = off + bytes;
    for (auto& c : g.ctas) extend_window(c.get(), g.static_end);
  }
  return f->cta->smem + it->second;
}
size_t dynamic_smem_size() { return g.current ? g.current->cta->smem_size : 0; }

uint32_t shared_addr(const void* generic) {
  Fiber* f = cur();
  const uintptr_t a = reinterpret_cast<uintptr_t>(generic);
  for (auto& c : g.ctas) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(c->smem);
    if (a >= lo - kGuardBytes && a < lo + c->smem_size + kGuardBytes) return static_cast<uint32_t>(a - lo);
  }
  add_report("oob-shared", "cvta.to.shared of a pointer that is not shared memory, by " + who(f), __builtin_return_address(0));
  return 0xFFFFFFF0u;
}

uint8_t* shared_ptr(uint32_t addr) { return cur()->cta->smem + addr; }

uint8_t* cluster_shared_ptr(uint32_t addr, unsigned rank) {
  if (rank >= g.ctas.size()) {
    add_report("oob-shared", "mapa to cluster rank " + std::to_string(rank) + " of a cluster of " +
                                 std::to_string(g.ctas.size()) + ", by " + who(cur()),
               __builtin_return_address(0));
    rank = 0;
  }
  return g.ctas[rank]->smem + addr;
}

namespace {
// Bounds check of a shared access made on behalf of thread tid; false (and a report) when out.
bool shared_ok(Cta* c, uint32_t addr, size_t n, int tid, const char* what, const void* pc) {
  if (static_cast<size_t>(addr) + n <= c->smem_size) return true;
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s of %zu bytes at shared address 0x%x by tid %d: outside the %zu bytes of dynamic shared memory",
                what, n, addr, tid, c->smem_size);
  add_report("oob-shared", buf, pc);
  return false;
}
}  // namespace

void smem_read(uint32_t addr, void* dst, size_t n, int tid, bool async_proxy) {
  Cta* c = cur()->cta;
  const void* pc = __builtin_return_address(0);
  if (!shared_ok(c, addr, n, tid, async_proxy ? "wgmma operand read" : "read", pc)) {
    std::memset(dst, 0, n);
    return;
  }
  shadow_access(c, c->fibers[tid], addr, n, false, async_proxy, pc);
  std::memcpy(dst, c->smem + addr, n);
  count_access(c->fibers[tid], reinterpret_cast<uintptr_t>(pc), reinterpret_cast<uintptr_t>(c->smem + addr),
               static_cast<uint32_t>(n));
}

void smem_write(uint32_t addr, const void* src, size_t n, int tid) {
  Cta* c = cur()->cta;
  const void* pc = __builtin_return_address(0);
  if (!shared_ok(c, addr, n, tid, "write", pc)) return;
  shadow_access(c, c->fibers[tid], addr, n, true, false, pc);
  std::memcpy(c->smem + addr, src, n);
  count_access(c->fibers[tid], reinterpret_cast<uintptr_t>(pc), reinterpret_cast<uintptr_t>(c->smem + addr),
               static_cast<uint32_t>(n));
}

void gmem_read(const void* src, void* dst, size_t n, int tid) {
  const void* pc = __builtin_return_address(0);
  if (!find_global(reinterpret_cast<uintptr_t>(src), n)) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "read of %zu bytes at %p on behalf of tid %d: not inside any device buffer of this launch", n,
                  src, tid);
    add_report("oob-global", buf, pc);
    std::memset(dst, 0, n);
    return;
  }
  std::memcpy(dst, src, n);
  if (g.cur_counters) g.cur_counters->gmem_bytes_read += n;
}

// ------------------------------------------------------------------ collectives and barriers

void collective(const char* op, int scope, uint32_t lanes, const uint32_t* in, int n_in, uint32_t* out, int n_out,
                const CollectiveFn& fn) {
  Fiber* f = cur();
  Cta* c = f->cta;
  const int size = scope ? scope : c->nthreads;
  const int group = scope ? f->pos.tid / scope : 0;
  const int member = scope ? f->pos.tid % scope : f->pos.tid;
  const void* pc = __builtin_return_address(0);
  // Members: for a warp, the lanes of `lanes` that exist; for larger scopes, every thread.
  int expected = 0;
  if (scope == 32) {
    for (int l = 0; l < 32; ++l)
      if ((lanes >> l & 1u) && group * 32 + l < c->nthreads) ++expected;
    if (!(lanes >> member & 1u)) {
      add_report("divergent-collective", std::string(op) + " by " + who(f) + " whose lane is not in its member mask", pc);
      return;
    }
  } else {
    expected = std::min(size, c->nthreads - group * size);
  }
  CollectiveState& s = c->collectives[{scope, group, scope == 32 ? lanes : 0u}];
  if (s.arrived == 0) {
    s.op = op;
    s.n_in = n_in;
    s.n_out = n_out;
    s.in.assign(static_cast<size_t>(size) * n_in, 0);
    s.out.assign(static_cast<size_t>(size) * n_out, 0);
    s.out_ptr.assign(size, nullptr);
    s.joined.assign(size, 0);
  } else if (std::strcmp(s.op, op) != 0 || s.n_in != n_in || s.n_out != n_out) {
    add_report("divergent-collective",
               who(f) + " reached " + op + " while other members of its group wait in " + s.op, pc);
    g.aborted = true;
    switch_to_scheduler();
  }
  std::memcpy(&s.in[static_cast<size_t>(member) * n_in], in, 4 * n_in);
  s.out_ptr[member] = out;
  s.joined[member] = 1;
  ++s.arrived;
  if (s.arrived < expected) {
    block_current(Wait::kCollective, op, group);
    return;  // out written by the last arriver
  }
  g.in_collective_fn = true;
  fn(s.in.data(), s.out.data(), size);
  g.in_collective_fn = false;
  for (int m = 0; m < size; ++m)
    if (s.out_ptr[m] && n_out) std::memcpy(s.out_ptr[m], &s.out[static_cast<size_t>(m) * n_out], 4 * n_out);
  if (!std::strcmp(op, "syncwarp")) {  // bar.warp.sync orders memory among its lanes (PTX 9.7.13.3)
    std::vector<Fiber*> members;
    for (int m = 0; m < size; ++m)
      if (s.joined[m]) members.push_back(c->fibers[group * size + m]);
    join_clocks(members);
  }
  // Only this collective's members: other masks of the same warp may wait in the same op.
  for (int m = 0; m < size; ++m) {
    Fiber* o = s.joined[m] ? c->fibers[(scope ? group * size : 0) + m] : nullptr;
    if (o && o != f && o->wait == Wait::kCollective) wake(o);
  }
  s.arrived = 0;
}

void bar_sync(int id, int count) {
  Fiber* f = cur();
  Cta* c = f->cta;
  if (id < 0 || id >= kMaxBarriers || count < 0 || count % 32 || count > c->nthreads) {
    add_report("bad-launch", "bar.sync " + std::to_string(id) + ", " + std::to_string(count) + " by " + who(f) +
                                 ": id must be 0..15 and count a multiple of 32 up to the CTA size",
               __builtin_return_address(0));
    return;
  }
  BarrierState& b = c->bars[id];
  if (b.arrived && b.expected != count) {
    add_report("barrier-deadlock", "barrier " + std::to_string(id) + " used with thread counts " +
                                       std::to_string(b.expected) + " and " + std::to_string(count) + " by " + who(f),
               __builtin_return_address(0));
  }
  b.expected = count;
  ++b.arrived;
  b.waiting.push_back(f);
  f->wait = Wait::kBarrier;
  f->wait_what = "bar.sync";
  f->wait_id = id;
  if (!release_barrier(c, id)) {
    switch_to_scheduler();
    if (g.aborted) switch_to_scheduler();
  }
}

void cluster_arrive(bool release) {
  Fiber* f = cur();
  if (f->cl_arrived >= 0) {
    add_report("cluster-barrier", "barrier.cluster.arrive by " + who(f) + " that already arrived and has not waited",
               __builtin_return_address(0));
    return;
  }
  f->cl_arrived = g_cbar.phase;
  ++g_cbar.arrived;
  for (auto& [key, m] : g_mbars)
    if (m.vis_phase < 0 && m.init_ct == f->pos.cluster_tid && f->mbar_fences > m.init_fences) m.vis_phase = g_cbar.phase;
  if (release) {
    g_cbar.acc.join(f);
    new_epoch(f);
  }
  release_cluster();
}

void cluster_wait(bool acquire_) {
  Fiber* f = cur();
  if (f->cl_arrived < 0) {
    add_report("cluster-barrier", "barrier.cluster.wait by " + who(f) + " without a barrier.cluster.arrive before it",
               __builtin_return_address(0));
    return;
  }
  if (f->cl_arrived == g_cbar.phase) {  // its phase has not completed
    g_cbar.waiting.push_back(f);
    block_current(Wait::kCluster, "barrier.cluster.wait", 0);
  }
  f->cl_waited = f->cl_arrived;
  f->cl_arrived = -1;
  if (acquire_) acquire(f, g_cbar.done);
}

void cluster_sync() {
  cluster_arrive(true);
  cluster_wait(true);
}

// ---- mbarrier, st.async, mapa ---------------------------------------------------------------

namespace {
constexpr uint32_t kRankShift = 24;  // emulated shared::cluster address: (rank + 1) << 24 | offset

// A shared::cta address (own CTA) or a mapa result -> (rank, offset).
std::pair<unsigned, uint32_t> decode_cluster_addr(uint32_t a) {
  const uint32_t hi = a >> kRankShift;
  if (hi == 0) return {cur()->pos.cta_rank, a};
  return {hi - 1, a & ((1u << kRankShift) - 1)};
}

// The mbarrier at `addr` for an operation by the calling thread, or null (reported): it must
// exist (mbarrier.init), its init must happen before the use, and a use from another CTA needs
// the initialiser's fence.mbarrier_init.release.cluster after the init (PTX 9.7.13.15.2).
Mbarrier* mbar_lookup(uint32_t addr, const char* op, const void* pc) {
  Fiber* f = cur();
  const auto [rank, off] = decode_cluster_addr(addr);
  if (rank >= g.ctas.size() || off % 8 || off + 8 > g.ctas[rank]->smem_size) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s on shared::cluster address 0x%x by %s: not an 8-byte aligned shared address of the cluster",
                  op, addr, who(f).c_str());
    add_report("mbarrier", buf, pc);
    return nullptr;
  }
  auto it = g_mbars.find({rank, off});
  if (it == g_mbars.end()) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s by %s on shared 0x%x of cta %u, where no mbarrier.init was done", op, who(f).c_str(), off,
                  rank);
    add_report("mbarrier", buf, pc);
    return nullptr;
  }
  Mbarrier& m = it->second;
  const bool by_cluster_barrier = m.vis_phase >= 0 && f->cl_waited >= m.vis_phase;
  if (!by_cluster_barrier && !ordered(f, m.init_ct, m.init_clk)) {
    add_report("mbarrier", std::string(op) + " by " + who(f) + " on " + mbar_name(m) +
                               " not ordered after its mbarrier.init by " + tid_name(m.init_ct) +
                               " (no barrier between; across CTAs: fence.mbarrier_init.release.cluster, then a cluster barrier)",
               pc);
  } else if (!by_cluster_barrier && rank != f->pos.cta_rank && g.fibers[m.init_ct]->mbar_fences == m.init_fences) {
    add_report("mbarrier", std::string(op) + " by " + who(f) + " on " + mbar_name(m) + " of another CTA: " +
                               tid_name(m.init_ct) + " did no fence.mbarrier_init.release.cluster after the init",
               pc);
  }
  return &m;
}
}  // namespace

uint32_t mapa(uint32_t addr, unsigned rank) {
  if (rank >= g.ctas.size() || (addr >> kRankShift)) {
    add_report("oob-shared", "mapa of shared 0x" + std::to_string(addr) + " to cluster rank " + std::to_string(rank) +
                                 " of a cluster of " + std::to_string(g.ctas.size()) + ", by " + who(cur()),
               __builtin_return_address(0));
    rank = 0;
  }
  return ((rank + 1) << kRankShift) | addr;
}

uint8_t* cluster_addr_ptr(uint32_t addr) {
  const auto [rank, off] = decode_cluster_addr(addr);
  if (rank >= g.ctas.size()) return nullptr;
  return g.ctas[rank]->smem + off;
}

void mbar_init(uint32_t addr, int count) {
  Fiber* f = cur();
  const void* pc = __builtin_return_address(0);
  if ((addr >> kRankShift) || addr % 8 || addr + 8 > f->cta->smem_size || count < 1 || count > kMaxTx) {
    add_report("mbarrier", "mbarrier.init of shared 0x" + std::to_string(addr) + " with count " + std::to_string(count) + " by " +
                               who(f) + ": needs an 8-byte aligned shared::cta address and 1 <= count <= 2^20-1",
               pc);
    return;
  }
  Mbarrier& m = g_mbars[{f->pos.cta_rank, addr}];
  if (!m.waiting.empty()) add_report("mbarrier", "mbarrier.init of " + mbar_name(m) + " while threads wait on it, by " + who(f), pc);
  m = Mbarrier{};
  m.owner = f->pos.cta_rank;
  m.off = addr;
  m.expected = m.pending = count;
  m.init_ct = f->pos.cluster_tid;
  m.init_clk = f->vc[f->pos.tid];
  m.init_fences = f->mbar_fences;
  new_epoch(f);
}

void fence_mbarrier_init() { ++cur()->mbar_fences; }

uint64_t mbar_arrive(uint32_t addr, int count, int64_t tx, bool release, bool cluster_scope) {
  Fiber* f = cur();
  const void* pc = __builtin_return_address(0);
  Mbarrier* m = mbar_lookup(addr, tx ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive", pc);
  if (!m) return 0;
  if (m->owner != f->pos.cta_rank && !cluster_scope)
    add_report("mbarrier", "remote mbarrier.arrive by " + who(f) + " on " + mbar_name(*m) +
                               " at .cta scope: it orders nothing for the owner's threads (use .cluster)",
               pc);
  const uint64_t state = static_cast<uint64_t>(m->phase);
  m->tx += tx;
  if (m->tx > kMaxTx || m->tx < -kMaxTx)
    add_report("mbarrier", mbar_name(*m) + ": tx-count " + std::to_string(m->tx) + " outside [-(2^20-1), 2^20-1] after expect_tx by " +
                               who(f), pc);
  mbar_release(*m, f, release, cluster_scope);
  m->pending -= count;
  if (m->pending < 0) {
    add_report("mbarrier", mbar_name(*m) + ": " + std::to_string(-m->pending) + " arrival(s) more than its expected count " +
                               std::to_string(m->expected) + " in phase " + std::to_string(m->phase) + ", by " + who(f),
               pc);
    m->pending = 0;
  }
  mbar_try_complete(*m, pc);
  return state;
}

void mbar_complete_tx(uint32_t addr, int64_t bytes) {
  Fiber* f = cur();
  const void* pc = __builtin_return_address(0);
  Mbarrier* m = mbar_lookup(addr, "mbarrier.complete_tx", pc);
  if (!m) return;
  m->tx -= bytes;
  mbar_release(*m, f, true, true);
  mbar_try_complete(*m, pc);
}

void st_async(uint32_t dst, const void* src, int n, uint32_t bar) {
  Fiber* f = cur();
  const void* pc = __builtin_return_address(0);
  const auto [drank, doff] = decode_cluster_addr(dst);
  const auto [brank, boff] = decode_cluster_addr(bar);
  (void)boff;
  if (drank >= g.ctas.size() || doff % n || doff + n > g.ctas[drank]->smem_size) {
    add_report("oob-shared", "st.async of " + std::to_string(n) + " bytes to shared::cluster 0x" + std::to_string(dst) + " by " +
                                 who(f) + ": not an aligned shared address of the cluster",
               pc);
    return;
  }
  if (drank != brank) {
    add_report("mbarrier", "st.async by " + who(f) + ": destination in cta " + std::to_string(drank) + " but its mbarrier in cta " +
                               std::to_string(brank) + " (both must be in the same CTA)",
               pc);
    return;
  }
  Mbarrier* m = mbar_lookup(bar, "st.async", pc);
  Cta* c = g.ctas[drank].get();
  if (c->live == 0) add_report("dsmem-exited", "st.async by " + who(f) + " to cta " + std::to_string(drank) + " after it exited", pc);
  // The store, as a write by f at its current clock; the complete-tx that follows releases it
  // (at cluster scope) to the threads that observe the phase completion.
  shadow_access(c, f, doff, n, true, false, pc);
  std::memcpy(c->smem + doff, src, n);
  count_access(f, reinterpret_cast<uintptr_t>(pc), reinterpret_cast<uintptr_t>(c->smem + doff), static_cast<uint32_t>(n));
  if (!m) return;
  m->tx -= n;
  mbar_release(*m, f, true, true);
  mbar_try_complete(*m, pc);
}

void mbar_expect_tx(uint32_t addr, int64_t tx) {
  const void* pc = __builtin_return_address(0);
  Mbarrier* m = mbar_lookup(addr, "mbarrier.expect_tx", pc);
  if (!m) return;
  m->tx += tx;
  if (m->tx > kMaxTx) add_report("mbarrier", mbar_name(*m) + ": tx-count above 2^20-1 after expect_tx by " + who(cur()), pc);
}

bool mbar_wait(uint32_t addr, int parity, bool acquire_cluster, bool blocking) {
  Fiber* f = cur();
  const void* pc = __builtin_return_address(0);
  if (addr >> kRankShift && decode_cluster_addr(addr).first != f->pos.cta_rank) {
    add_report("mbarrier", "mbarrier wait by " + who(f) + " on another CTA's mbarrier (only arrive may be remote)", pc);
    return true;
  }
  Mbarrier* m = mbar_lookup(addr & ((1u << kRankShift) - 1), "mbarrier.try_wait", pc);
  if (!m) return true;
  f->woke_local.clear();
  f->woke_cluster.clear();
  if ((m->phase & 1) == (parity & 1)) {  // the phase of this parity has not completed yet
    m->waiting.push_back(f);
    block_current(Wait::kMbarrier, "mbarrier.try_wait", static_cast<int>(m->off));
    if (!blocking) return false;  // test_wait: the test happened before the completion
  } else {
    // Completed earlier: the clocks of the last completed phase.
    f->woke_local = m->done_local;
    f->woke_cluster = m->done_cluster;
  }
  acquire(f, f->woke_local);
  if (acquire_cluster) acquire(f, f->woke_cluster);
  return true;
}


void yield() {
  // Let every other thread run once before this one continues (spin loops make progress).
  switch_to_scheduler();
}

// ------------------------------------------------------------------ cp.async

void cp_async(uint32_t dst, const void* src, int cp_size, int src_size) {
  Fiber* f = cur();
  Cta* c = f->cta;
  const void* pc = __builtin_return_address(0);
  if (dst % cp_size) {
    add_report("misaligned", "cp.async of " + std::to_string(cp_size) + " bytes to shared 0x" + std::to_string(dst) +
                                 " by " + who(f),
               pc);
    return;
  }
  if (!shared_ok(c, dst, cp_size, f->pos.tid, "cp.async", pc)) return;
  if (src_size > 0 && !find_global(reinterpret_cast<uintptr_t>(src), src_size)) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "cp.async source of %d bytes at %p by %s: not inside any device buffer of this launch",
                  src_size, src, who(f).c_str());
    add_report("oob-global", buf, pc);
    src_size = 0;
  }
  // The destination is written asynchronously: racing accesses by others are reported at the
  // wait (as the write), reads before the wait are reported as pending.
  for (int i = 0; i < cp_size; ++i) {
    ByteShadow& s = c->shadow[dst + i];
    if (s.pending) {
      add_report("race", "cp.async by " + who(f) + " to shared bytes another outstanding cp.async also writes", pc);
      break;
    }
  }
  for (int i = 0; i < cp_size; ++i) c->shadow[dst + i].pending = 1;
  f->copies.push_back({dst, static_cast<const uint8_t*>(src), cp_size, src_size, -1});
  if (g.cur_counters) g.cur_counters->cp_async_bytes += cp_size;
  count_access(f, reinterpret_cast<uintptr_t>(pc), reinterpret_cast<uintptr_t>(src), cp_size);
}

void cp_async_commit() {
  Fiber* f = cur();
  bool any = false;
  for (PendingCopy& p : f->copies)
    if (p.group < 0) p.group = f->cp_groups, any = true;
  (void)any;
  ++f->cp_groups;  // an empty group is a group too (PTX: commit_group with no cp.async)
}

void cp_async_wait(int n) {
  Fiber* f = cur();
  Cta* c = f->cta;
  const int retire_below = f->cp_groups - n;
  std::vector<PendingCopy> keep;
  for (PendingCopy& p : f->copies) {
    if (p.group < 0 || p.group >= retire_below) {
      keep.push_back(p);
      continue;
    }
    uint8_t bytes[16] = {0};
    if (p.src_size > 0) std::memcpy(bytes, p.src, std::min(p.src_size, p.cp_size));
    for (int i = 0; i < p.cp_size; ++i) c->shadow[p.dst + i].pending = 0;
    shadow_access(c, f, p.dst, p.cp_size, true, false, __builtin_return_address(0));
    std::memcpy(c->smem + p.dst, bytes, p.cp_size);
    if (g.cur_counters) g.cur_counters->gmem_bytes_read += std::max(p.src_size, 0);
  }
  f->copies.swap(keep);
}

// ------------------------------------------------------------------ wgmma bookkeeping

void wgmma_defer(float* acc, const float* value, int n) {
  Fiber* f = cur();
  f->wgmmas.push_back({acc, std::vector<float>(value, value + n), -1});
  for (int i = 0; i < n; ++i) acc[i] = std::nanf("");
}

void wgmma_accumulator_in(const float* acc, float* value, int n) {
  Fiber* f = cur();
  for (auto it = f->wgmmas.rbegin(); it != f->wgmmas.rend(); ++it)
    if (it->acc == acc && static_cast<int>(it->value.size()) == n) {
      std::memcpy(value, it->value.data(), 4 * n);
      return;
    }
  std::memcpy(value, acc, 4 * n);
}

void wgmma_commit() {
  Fiber* f = cur();
  for (PendingWgmma& w : f->wgmmas)
    if (w.group < 0) w.group = f->wg_groups;
  ++f->wg_groups;
}

void wgmma_wait(int n) {
  Fiber* f = cur();
  const int retire_below = f->wg_groups - n;
  std::vector<PendingWgmma> keep;
  for (PendingWgmma& w : f->wgmmas) {
    if (w.group < 0 || w.group >= retire_below) {
      keep.push_back(std::move(w));
      continue;
    }
    // Chained wgmmas on one accumulator: the newest retired value wins (it includes the others).
    bool newer = false;
    for (PendingWgmma& o : f->wgmmas)
      if (&o != &w && o.acc == w.acc && o.group >= 0 && o.group < retire_below && &o > &w) newer = true;
    if (!newer) std::memcpy(w.acc, w.value.data(), 4 * w.value.size());
  }
  f->wgmmas.swap(keep);
}

void wgmma_fence() {}
void fence_proxy_async() { ++cur()->proxy_fences; }

void report(const char* kind, const std::string& text) {
  add_report(kind, text + " (" + who(cur()) + ")", __builtin_return_address(0));
}

void count_instruction(const char* what) {
  Counters* k = g.cur_counters;
  if (!k) return;
  if (!std::strncmp(what, "mma", 3)) ++k->mma_sync;
  else if (!std::strncmp(what, "ldmatrix", 8)) ++k->ldmatrix;
  else if (!std::strncmp(what, "wgmma", 5)) ++k->wgmma;
}

void on_access_hook(void* p, size_t n, bool write, const void* pc) { on_access(p, n, write, pc); }

void trap(const char* why) {
  add_report("trap", std::string("__trap(): ") + why + " in " + who(cur()), __builtin_return_address(0));
  g.aborted = true;
  switch_to_scheduler();
  std::abort();
}

// ------------------------------------------------------------------ atomics

namespace {
bool atomic_ok(void* p, size_t n) {
  Fiber* f = cur();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!f) return true;
  if (find_global(a, n)) {
    if (g.cur_counters) g.cur_counters->gmem_bytes_written += n;
    return true;
  }
  for (auto& c : g.ctas)
    if (in_region(c.get(), a, n)) return true;
  add_report("oob-global", "atomic on " + std::to_string(n) + " bytes at a non-device address by " + who(f),
             __builtin_return_address(1));
  return false;
}
template <typename T>
T rmw(T old, const char* op, T v, T cmp) {
  if (!std::strcmp(op, "add")) return old + v;
  if (!std::strcmp(op, "max")) return std::max(old, v);
  if (!std::strcmp(op, "min")) return std::min(old, v);
  if (!std::strcmp(op, "exch")) return v;
  if (!std::strcmp(op, "cas")) return old == cmp ? v : old;
  return old;
}
}  // namespace

uint32_t atomic32(void* p, const char* op, uint32_t v, uint32_t cmp, bool is_float, bool is_signed) {
  if (!atomic_ok(p, 4)) return 0;
  uint32_t old;
  std::memcpy(&old, p, 4);
  uint32_t r;
  if (is_float) {
    float a, b, cf;
    std::memcpy(&a, &old, 4);
    std::memcpy(&b, &v, 4);
    std::memcpy(&cf, &cmp, 4);
    const float x = rmw(a, op, b, cf);
    std::memcpy(&r, &x, 4);
  } else if (is_signed) {
    r = static_cast<uint32_t>(rmw(static_cast<int32_t>(old), op, static_cast<int32_t>(v), static_cast<int32_t>(cmp)));
  } else if (!std::strcmp(op, "or")) {
    r = old | v;
  } else if (!std::strcmp(op, "and")) {
    r = old & v;
  } else if (!std::strcmp(op, "xor")) {
    r = old ^ v;
  } else {
    r = rmw(old, op, v, cmp);
  }
  std::memcpy(p, &r, 4);
  return old;
}

uint64_t atomic64(void* p, const char* op, uint64_t v, uint64_t cmp, bool is_float) {
  if (!atomic_ok(p, 8)) return 0;
  uint64_t old;
  std::memcpy(&old, p, 8);
  uint64_t r;
  if (is_float) {
    double a, b, cd;
    std::memcpy(&a, &old, 8);
    std::memcpy(&b, &v, 8);
    std::memcpy(&cd, &cmp, 8);
    const double x = rmw(a, op, b, cd);
    std::memcpy(&r, &x, 8);
  } else if (!std::strcmp(op, "or")) {
    r = old | v;
  } else {
    r = rmw(old, op, v, cmp);
  }
  std::memcpy(p, &r, 8);
  return old;
}

}  // namespace emu

// ------------------------------------------------------------------ ctypes API

namespace {
std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) {
      o += ' ';
      continue;
    }
    o += ch;
  }
  return o;
}
std::string g_json;
}  // namespace

extern "C" {
void emu_register_global(const void* p, size_t n, const char* name) { emu::register_global(p, n, name); }
void emu_clear_globals() { emu::clear_globals(); }
void emu_clear_reports() { emu::clear_reports(); }
void emu_clear_counters() { emu::clear_counters(); }
void emu_set_report_limit(int n) { emu::set_report_limit(n); }
void emu_set_env(const char* name, const char* value) {
  if (value && *value) setenv(name, value, 1);
  else unsetenv(name);
}
const char* emu_reports_json() {
  g_json = "[";
  bool first = true;
  for (const emu::Report& r : emu::reports()) {
    if (!first) g_json += ",";
    first = false;
    g_json += "{\"kind\":\"" + json_escape(r.kind) + "\",\"kernel\":\"" + json_escape(r.kernel) + "\",\"text\":\"" +
              json_escape(r.text) + "\"}";
  }
  g_json += "]";
  return g_json.c_str();
}
const char* emu_counters_json() {
  g_json = "{";
  bool first = true;
  for (auto& [name, c] : emu::counters()) {
    if (!first) g_json += ",";
    first = false;
    char buf[1024];
    std::snprintf(buf, sizeof buf,
                  "\"%s\":{\"launches\":%" PRIu64 ",\"ctas\":%" PRIu64 ",\"threads\":%" PRIu64
                  ",\"smem_requests\":%" PRIu64 ",\"smem_wavefronts\":%" PRIu64 ",\"gmem_requests\":%" PRIu64
                  ",\"gmem_sectors\":%" PRIu64 ",\"gmem_bytes_read\":%" PRIu64 ",\"gmem_bytes_written\":%" PRIu64
                  ",\"cp_async_bytes\":%" PRIu64 ",\"mma_sync\":%" PRIu64 ",\"wgmma\":%" PRIu64 ",\"ldmatrix\":%" PRIu64
                  ",\"barriers\":%" PRIu64 ",\"cluster_barriers\":%" PRIu64 ",\"mbarrier_phases\":%" PRIu64 "}",
                  json_escape(name).c_str(), c.launches, c.ctas, c.threads, c.smem_requests, c.smem_wavefronts,
                  c.gmem_requests, c.gmem_sectors, c.gmem_bytes_read, c.gmem_bytes_written, c.cp_async_bytes, c.mma_sync,
                  c.wgmma, c.ldmatrix, c.barriers, c.cluster_barriers, c.mbarrier_phases);
    g_json += buf;
  }
  g_json += "}";
  return g_json.c_str();
}

// ---- the compiler's ThreadSanitizer hooks (kernel TUs are built with -fsanitize=thread) ----
#define DSA_EMU_HOOK(N)                                                                                  \
  void __tsan_read##N(void* p) { emu::on_access_hook(p, N, false, __builtin_return_address(0)); }          \
  void __tsan_write##N(void* p) { emu::on_access_hook(p, N, true, __builtin_return_address(0)); }          \
  void __tsan_unaligned_read##N(void* p) { emu::on_access_hook(p, N, false, __builtin_return_address(0)); } \
  void __tsan_unaligned_write##N(void* p) { emu::on_access_hook(p, N, true, __builtin_return_address(0)); } \
  void __tsan_volatile_read##N(void* p) { emu::on_access_hook(p, N, false, __builtin_return_address(0)); }  \
  void __tsan_volatile_write##N(void* p) { emu::on_access_hook(p, N, true, __builtin_return_address(0)); }
DSA_EMU_HOOK(1)
DSA_EMU_HOOK(2)
DSA_EMU_HOOK(4)
DSA_EMU_HOOK(8)
DSA_EMU_HOOK(16)
#undef DSA_EMU_HOOK
void __tsan_read_range(void* p, unsigned long n) { emu::on_access_hook(p, n, false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { emu::on_access_hook(p, n, true, __builtin_return_address(0)); }
// std::atomic in launcher host code (instrumented TU, outside kernels): plain atomics.
#define DSA_EMU_ATOMIC(N, T)                                                                          \
  T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                  \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);             \
  }                                                                                                   \
  int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                    \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);             \
  }                                                                                                   \
  T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                        \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
    return c;                                                                                         \
  }
DSA_EMU_ATOMIC(8, uint8_t)
DSA_EMU_ATOMIC(16, uint16_t)
DSA_EMU_ATOMIC(32, uint32_t)
DSA_EMU_ATOMIC(64, uint64_t)
#undef DSA_EMU_ATOMIC
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  emu::on_access_hook(const_cast<void*>(s), n, false, __builtin_return_address(0));
  emu::on_access_hook(d, n, true, __builtin_return_address(0));
  return std::memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  emu::on_access_hook(const_cast<void*>(s), n, false, __builtin_return_address(0));
  emu::on_access_hook(d, n, true, __builtin_return_address(0));
  return std::memmove(d, s, n);
}
void* __tsan_memset(void* d, int v, unsigned long n) {
  emu::on_access_hook(d, n, true, __builtin_return_address(0));
  return std::memset(d, v, n);
}
}
