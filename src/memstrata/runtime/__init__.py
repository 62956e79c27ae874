"""execute — carry a Plan out in PyTorch.

* `ActivationRuntime` — saved-tensor hooks, unit recompute, copies (activations.py)
* `CopyContext`, `TensorEvent` — every copy stream in one place (streams.py)
* `HostBufferPool` — pinned (CUDA) / aligned host buffers (pool.py)
* `NVMeStore` — files under a directory, thread pool, O_DIRECT (nvme.py)
* `forced_plan` — one decision kind everywhere (forced.py)
"""

from .activations import ActivationRuntime, StepStats
from .errors import MemstrataRuntimeError, NVMeDirectoryError, NVMeIOError, UnrecomputableUnitError
from .forced import KINDS as FORCED_KINDS
from .forced import forced_plan
from .nvme import NVMeStore, check_directory
from .pool import HostBufferPool
from .streams import CopyContext, TensorEvent

__all__ = [
    "ActivationRuntime", "StepStats", "forced_plan", "FORCED_KINDS",
    "CopyContext", "TensorEvent", "HostBufferPool", "NVMeStore", "check_directory",
    "MemstrataRuntimeError", "NVMeDirectoryError", "NVMeIOError", "UnrecomputableUnitError",
]
