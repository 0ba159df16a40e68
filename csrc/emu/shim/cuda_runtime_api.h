// Host stand-in for <cuda_runtime_api.h> under the emulator: the runtime API is in cuda_runtime.h.
#pragma once
#include "cuda_runtime.h"
