// topk family: torch-free launchers (placeholder until the family lands).
#include "common/cuda_utils.cuh"
