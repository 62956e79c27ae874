"""execute — carry a Plan out in PyTorch.

* `ActivationRuntime` — saved-tensor hooks and the step's event clock (activations.py)
* `TierMover` — evict / prefetch / restore / release between tiers (mover.py)
* unit interception, checkpoint, SAC policy, buffer guard (recompute.py)
* `CopyContext`, `TensorEvent` — every copy stream in one place (streams.py)
* `HostBufferPool` — pinned (CUDA) / aligned host buffers (pool.py)
* `NVMeStore` — files under a directory, thread pool, O_DIRECT (nvme.py)
* `TieredOptimizer`, `StatePlacement` — optimizer states on host / NVMe between steps (states.py)
"""

from .activations import ActivationRuntime, StepStats
from .mover import Placement, TierMover
from .errors import MemstrataRuntimeError, NVMeDirectoryError, NVMeIOError, UnrecomputableUnitError
from .nvme import NVMeStore, check_directory
from .pool import HostBufferPool
from .states import StatePlacement, TieredOptimizer
from .streams import CopyContext, TensorEvent

__all__ = [
    "ActivationRuntime", "StepStats", "TierMover", "Placement",
    "TieredOptimizer", "StatePlacement",
    "CopyContext", "TensorEvent", "HostBufferPool", "NVMeStore", "check_directory",
    "MemstrataRuntimeError", "NVMeDirectoryError", "NVMeIOError", "UnrecomputableUnitError",
]
