// Host stand-in for <cooperative_groups.h> under the emulator: the thread-block-cluster
// subset our kernels use (CUDA C++ guide, "Cluster Group"; PTX 9.7.13.7 barrier.cluster,
// 9.7.9.21 mapa). A cluster's CTAs run together in the emulator, so sync() is a real barrier
// across them and map_shared_rank() points into the peer CTA's own shared memory.
#pragma once
#include "cuda_runtime.h"

namespace cooperative_groups {

struct cluster_group {
  void sync() const { emu::cluster_sync(); }
  unsigned block_rank() const { return emu::self().cta_rank; }
  unsigned num_blocks() const {
    const emu::Dim3 c = emu::cluster_dim();
    return c.x * c.y * c.z;
  }
  dim3 block_index() const {
    const emu::Dim3 c = emu::cluster_dim(), b = emu::self().block;
    return dim3(b.x % c.x, b.y % c.y, b.z % c.z);
  }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return reinterpret_cast<T*>(emu::cluster_shared_ptr(emu::shared_addr(p), rank));
  }
};
inline cluster_group this_cluster() { return {}; }

struct thread_block {
  void sync() const { __syncthreads(); }
  unsigned thread_rank() const { return static_cast<unsigned>(emu::self().tid); }
  unsigned size() const {
    const emu::Dim3 b = emu::block_dim();
    return b.x * b.y * b.z;
  }
};
inline thread_block this_thread_block() { return {}; }

}  // namespace cooperative_groups
