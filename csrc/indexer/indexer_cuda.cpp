// indexer family: CUDA glue (placeholder until the family lands).
#include <torch/library.h>
