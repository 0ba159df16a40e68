// The topk kernels' cluster synchronisation primitives: moved to common/cluster_sync.cuh (the
// mla_decode overlap kernel uses them too); topk keeps its spelling dsa::topk::csync.
#pragma once
#include "common/cluster_sync.cuh"

namespace dsa {
namespace topk {
namespace csync = ::dsa::csync;
}  // namespace topk
}  // namespace dsa
