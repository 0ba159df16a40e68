// dsa_ext's CPU emulator of CUDA kernels: the runtime interface (tests only; never in the
// product). The unchanged kernel sources (*_kernels.cuh, *_wgmma.cuh, common/*.cuh) and the
// launchers (*_launch.cu, rewritten by launch_rewrite.py only where `<<<...>>>` appears) are
// compiled by the host C++ compiler with -DDSA_EMULATOR against csrc/emu/shim (CUDA built-ins)
// and csrc/emu/ptx.h (PTX primitives with PTX-ISA semantics).
//
// Execution model
//   * Every CUDA thread is a fiber (ucontext) on one OS thread; a CTA's threads (a cluster's
//     CTAs together) run interleaved, switching at every barrier, warp collective, async wait
//     and spin hint, so the schedule is deterministic and a lost barrier is detected exactly
//     (no runnable thread left) instead of hanging.
//   * The kernel translation units are compiled with -fsanitize=thread but linked WITHOUT the
//     TSan runtime: the compiler's __tsan_read*/__tsan_write* hooks land in runtime.cpp, which
//     sees every load and store the kernel makes. That is how shared-memory races (vector
//     clocks joined at barriers), reads of cp.async bytes before their wait (poison), reads of
//     never-written shared memory, out-of-bounds shared/global accesses and the counters
//     (wavefronts, sectors, bytes) are observed on plain C++ loads and stores.
//   * Asynchrony is modelled: cp.async copies are deferred to the wait_group that covers them
//     (until then the destination bytes are marked pending and a read is reported); wgmma
//     results are deferred to wgmma.wait_group (accumulators are NaN-poisoned and marked
//     pending until then; see ptx.h).
//
// Everything here runs on the one emulator OS thread; nothing is thread-safe.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// ---- launching (used by the shim's <<<>>> replacement and by cudaLaunchKernelEx) ----------

struct LaunchSpec {
  const char* kernel = "?";  // name for reports
  Dim3 grid, block, cluster;
  size_t dynamic_smem = 0;   // bytes; the launch fails like CUDA above kMaxDynamicSmem
};
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // H100 opt-in limit per CTA
constexpr int kNumSms = 132;

// Runs body(ctx) once per CUDA thread of the grid (blockIdx/threadIdx set). Returns the CUDA
// status a real launch would give (cudaErrorInvalidValue for a bad configuration); hazards
// found while running are recorded in reports(), not returned. body/ctx rather than a
// std::function: the kernel-argument lambda then lives on the launcher's stack, which kernel
// code may read (argument evaluation), not on the heap, which it may not.
int launch(const LaunchSpec& spec, void (*body)(void*), void* ctx);
// Maximum dynamic shared memory a kernel was allowed by cudaFuncSetAttribute (48 KB default),
// and whether it may use non-portable cluster sizes (> 8); keyed by the kernel's address.
// A readable kernel name: the demangled symbol at `kernel` (so a launch through a function
// pointer variable is named by what it points to), else `fallback`. The string lives forever.
const char* kernel_name(const void* kernel, const char* fallback);
void set_kernel_attribute(const void* kernel, int attribute, int value);
int kernel_attribute(const void* kernel, int attribute);

// ---- global memory the kernel may touch ----------------------------------------------------

// Declares [base, base + bytes) as device memory for the following launches. Kernel accesses to
// any other address that is not the calling thread's stack, the CTA's shared memory or a
// registered read-only constant are reported as out of bounds.
void register_global(const void* base, size_t bytes, const char* name);
void clear_globals();

// ---- reports ---------------------------------------------------------------------------------

struct Report {
  std::string kind;    // "race", "oob-global", "oob-shared", "uninit-shared", "pending-cp-async",
                       // "pending-wgmma", "proxy-fence", "barrier-deadlock", "divergent-collective",
                       // "misaligned", "trap", "bad-launch", "mbarrier" (misuse of an mbarrier:
                       // uninitialised, init not visible, arrivals above the count, tx-count
                       // underflow/overflow, remote wait), "cluster-barrier" (arrive twice /
                       // wait without arrive), "dsmem-exited" (DSMEM access to an exited CTA)
  std::string kernel;  // LaunchSpec::kernel
  std::string text;    // address, threads (block, thread) and the place (return address)
};
const std::vector<Report>& reports();
void clear_reports();
// Stops recording after this many reports of one kind per launch (the rest are counted).
void set_report_limit(int n);

// ---- counters (per kernel name, accumulated over launches) ---------------------------------

struct Counters {
  uint64_t launches = 0, ctas = 0, threads = 0;
  uint64_t smem_requests = 0, smem_wavefronts = 0;   // warp-level shared accesses; 32 banks x 4 B
  uint64_t gmem_requests = 0, gmem_sectors = 0;      // warp-level global accesses; 32-byte sectors
  uint64_t gmem_bytes_read = 0, gmem_bytes_written = 0;
  uint64_t cp_async_bytes = 0;
  uint64_t mma_sync = 0, wgmma = 0, ldmatrix = 0;    // warp/warpgroup-level instructions issued
  uint64_t barriers = 0;
  uint64_t cluster_barriers = 0;  // completed barrier.cluster phases (also counted in barriers)
  uint64_t mbarrier_phases = 0;   // completed mbarrier phases
};
// Name -> counters, in first-launch order.
std::vector<std::pair<std::string, Counters>> counters();
void clear_counters();

// ---- what the shim and ptx.h build on (not for kernel code) --------------------------------

struct ThreadPos {
  Dim3 block, thread;
  unsigned cta_rank;  // rank in the cluster
  int tid;            // linear thread index in the CTA
  int cluster_tid;    // linear index over the cluster's threads (fiber id)
};
// By value: kernel code (instrumented) must not read emulator memory, which is not device memory.
ThreadPos self();
Dim3 block_dim();
Dim3 grid_dim();
Dim3 cluster_dim();

// Base of the calling CTA's dynamic shared memory (1024-byte aligned) and its size; the
// shared-window address used by cvta/ldmatrix/cp.async/descriptors is ptr - base (a CTA's
// shared window starts at 0 with the dynamic region; static objects, DSA_STATIC_SMEM, follow
// it — the reverse of the device's order, which no code may depend on).
uint8_t* dynamic_smem();
// A static shared object of the calling CTA (DSA_STATIC_SMEM): the first call from `site` in a
// launch places it after the dynamic region (every CTA at the same shared address, as on the
// device), extending each CTA's shared window.
uint8_t* static_smem(size_t bytes, size_t align, const char* site);
size_t dynamic_smem_size();
uint32_t shared_addr(const void* generic);          // __cvta_generic_to_shared
uint8_t* shared_ptr(uint32_t addr);                  // inverse, for the calling CTA
uint8_t* cluster_shared_ptr(uint32_t addr, unsigned cta_rank);  // mapa / DSMEM

// Checked accesses on behalf of thread `tid` of the calling CTA (ldmatrix, wgmma and
// cp.async do their shared-memory traffic through these, so the race / pending / bounds /
// proxy checks and the counters see them). `async_proxy` marks wgmma operand reads.
void smem_read(uint32_t addr, void* dst, size_t n, int tid, bool async_proxy = false);
void smem_write(uint32_t addr, const void* src, size_t n, int tid);
void gmem_read(const void* src, void* dst, size_t n, int tid);

// Cooperative collectives: every thread named in `lanes` of the calling thread's group
// (scope 32 = its warp, 128 = its warpgroup, 0 = the whole CTA) calls with the same op name and
// its own `in` words; when the last one arrives, fn(in, out) runs once, with in/out laid out
// [member][words], member = index within the group; each caller then gets its out words.
// A member missing forever is a barrier deadlock; different op names are a divergent collective.
using CollectiveFn = std::function<void(const uint32_t* in, uint32_t* out, int members)>;
void collective(const char* op, int scope, uint32_t lanes, const uint32_t* in, int n_in, uint32_t* out,
                int n_out, const CollectiveFn& fn);

// Barriers. bar_sync(id, count): named barrier `id` over `count` threads (count 0 = the CTA),
// as bar.sync / __syncthreads (PTX 9.7.13.4). cluster_sync: barrier.cluster arrive+wait.
//
// Race detection spans the cluster: a thread's vector clock covers every thread of its
// cluster (its own CTA's part plus what it has learnt of each peer CTA), so distributed
// shared memory accesses (map_shared_rank pointers, st.async) are checked against the peer's
// shadow like local ones. Cross-CTA happens-before comes only from barrier.cluster (arrive
// .release / wait .acquire, the default), mbarrier phases (arrive .release, try_wait .acquire,
// at .cta or .cluster scope) and st.async's complete-tx; fences alone order nothing here
// (a fence + relaxed-atomic flag protocol is not modelled and would be reported as a race).
void bar_sync(int id, int count);
void cluster_sync();
// barrier.cluster.arrive{.release|.relaxed} / barrier.cluster.wait{.acquire} (PTX 9.7.13.4):
// the split form; a thread must wait before it arrives again.
void cluster_arrive(bool release);
void cluster_wait(bool acquire);

// mbarrier (PTX 9.7.13.15): objects live at 8-byte aligned shared addresses; the emulator keeps
// their state (phase, pending arrivals, tx-count, clocks) beside the shared memory. Addresses
// are shared::cta offsets of the calling CTA, or shared::cluster addresses from mapa().
// A wait on a phase that never completes is a barrier-deadlock report (all threads blocked),
// not a hang; misuse is an "mbarrier" report.
uint32_t mapa(uint32_t shared_cta_addr, unsigned rank);  // mapa.shared::cluster (PTX 9.7.9.23)
uint8_t* cluster_addr_ptr(uint32_t shared_cluster_addr);  // host pointer of such an address
void mbar_init(uint32_t addr, int count);                 // mbarrier.init.shared::cta.b64
void fence_mbarrier_init();  // fence.mbarrier_init.release.cluster / fence.acq_rel.cluster (PTX 9.7.13.1)
// mbarrier.arrive{.expect_tx}{.release|.relaxed}{.cta|.cluster}: tx bytes expected first, then
// `count` arrivals. Returns the state token (the phase arrived in).
uint64_t mbar_arrive(uint32_t addr, int count, int64_t tx, bool release, bool cluster_scope);
void mbar_expect_tx(uint32_t addr, int64_t tx);    // mbarrier.expect_tx
void mbar_complete_tx(uint32_t addr, int64_t tx);  // mbarrier.complete_tx
// mbarrier.try_wait.parity (blocking: true once the phase of `parity` completed) or
// test_wait.parity (blocking false: may return false; the thread then sleeps until a phase
// completes so that spin loops make progress), .acquire at .cta or .cluster scope.
bool mbar_wait(uint32_t addr, int parity, bool acquire_cluster, bool blocking);
// st.async.shared::cluster.mbarrier::complete_tx::bytes (PTX 9.7.9.12): n bytes (4, 8, 16) to
// dst, then complete-tx of n bytes on the mbarrier `bar` in the destination's CTA.
void st_async(uint32_t dst, const void* src, int n, uint32_t bar);
void yield();  // a scheduling point (spin loops, __nanosleep)

// Asynchronous copies (cp.async, PTX 9.7.9.25): queued per thread; commit closes a group;
// wait_group(n) performs every copy of all but the newest n groups. Until then the
// destination bytes are pending: a read of them by any thread is reported.
void cp_async(uint32_t dst_shared, const void* src_global, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int n);

// Asynchronous warpgroup MMA bookkeeping (wgmma, PTX 9.7.15): register `acc` (n floats of the
// calling thread) as written by an in-flight wgmma whose result `value` is applied at the
// wgmma.wait_group that retires its group; until then acc holds NaN and reading it through
// emu::check_registers is reported.
void wgmma_defer(float* acc, const float* value, int n);
// The accumulator input of a wgmma: acc's in-flight value when an earlier wgmma of this thread
// still owes it (chaining wgmmas on one accumulator without a wait is legal, PTX 9.7.15.5.2),
// else acc itself. Reads through here are not reported.
void wgmma_accumulator_in(const float* acc, float* value, int n);
void wgmma_commit();
void wgmma_wait(int n);
void wgmma_fence();
void fence_proxy_async();

// Reports a hazard found by ptx.h or the shim (kind as in Report) at the caller's place.
void report(const char* kind, const std::string& text);
// Atomics (PTX 9.7.12.5 atom / red): bounds-checked and counted, exempt from race checks
// against other atomics. op: "add", "max", "min", "or", "and", "xor", "exch", "cas".
uint32_t atomic32(void* p, const char* op, uint32_t v, uint32_t cmp, bool is_float, bool is_signed);
uint64_t atomic64(void* p, const char* op, uint64_t v, uint64_t cmp, bool is_float);
[[noreturn]] void trap(const char* why);
// Counts one warp-level (mma*, ldmatrix*) or warpgroup-level (wgmma*) instruction; ptx.cpp
// calls it once per instruction, from the collective's fn.
void count_instruction(const char* what);
// The plain-access hook behind the __tsan_* entry points.
void on_access_hook(void* p, size_t n, bool write, const void* pc);

}  // namespace emu
