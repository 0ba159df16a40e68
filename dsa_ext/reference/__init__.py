"""dsa_ext.reference: a pure-PyTorch oracle for every op (SPEC section 3), written for clarity
and exactness (fp32/fp64 inside), used by the tests. One module per op family, plus `dense`:
the dense, masked formulation of the DeepSeek-V3.2 DSA step the sparse ops must agree with."""
from .cache import *  # noqa: F401,F403
from .hadamard import *  # noqa: F401,F403
from .indexer import *  # noqa: F401,F403
from .topk import *  # noqa: F401,F403
from .sparse_mla import *  # noqa: F401,F403
from .mla_decode import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403
from .compress import *  # noqa: F401,F403
from .dense import *  # noqa: F401,F403
from .v4 import *  # noqa: F401,F403
