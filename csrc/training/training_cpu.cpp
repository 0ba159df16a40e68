// training family: CPU kernels (SPEC section 7). Kernels in progress; until they land the ops
// have schemas, fake kernels and autograd but no CPU kernel.
#include <torch/library.h>
