"""execute — carry a Plan out in PyTorch.

* `ActivationRuntime` — saved-tensor hooks and the step's event clock (activations.py)
* `TierMover` — evict / prefetch / restore / release between tiers (mover.py)
* unit interception, checkpoint, SAC policy, buffer guard (recompute.py)
* `CopyContext`, `TensorEvent` — every copy stream in one place (streams.py)
* `HostBufferPool` — pinned (CUDA) / aligned host buffers (pool.py)
* `NVMeStore` — files under a directory, thread pool, O_DIRECT (nvme.py)
* `TieredOptimizer`, `StatePlacement` — optimizer states on host / NVMe between steps (states.py)
* `MasterWeights` — bf16/fp16 parameters with fp32 master weights as optimizer states (master.py)
"""

from .activations import ActivationRuntime, StepStats
from .mover import Placement, TierMover
from .errors import MemstrataRuntimeError, NVMeDirectoryError, NVMeIOError, UnrecomputableUnitError
from .nvme import NVMeStore, check_directory
from .pool import HostBufferPool
from .states import StatePlacement, TieredOptimizer
from .master import MasterWeights
from .streams import CopyContext, TensorEvent

__all__ = [
    "ActivationRuntime", "StepStats", "TierMover", "Placement",
    "TieredOptimizer", "StatePlacement", "MasterWeights",
    "CopyContext", "TensorEvent", "HostBufferPool", "NVMeStore", "check_directory",
    "MemstrataRuntimeError", "NVMeDirectoryError", "NVMeIOError", "UnrecomputableUnitError",
]
