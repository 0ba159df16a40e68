// mla_decode family: CPU kernels (placeholder until the family lands).
#include <torch/library.h>
