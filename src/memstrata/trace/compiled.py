"""What one step of a torch.compile'd model saved for backward, as plain data.

A compiled graph is one autograd node from the outside: AOTAutograd's
`CompiledFunction` saves the graph's activations with `ctx.save_for_backward`
at the end of its forward and reads them all back when its backward starts.
So the aten-level recorder of `record.py` has nothing to see inside it (no
ops, no module units); what a step of a compiled model does offer is the
sequence of tensors the graphs save (through the same saved-tensor hooks the
eager runtime uses) and the step's measured peak.  `CompiledTrace` is that
record; `runtime/compiled.py` observes it, `plan/compiled.py` plans over it.

    >>> t = CompiledTrace(model="m", fraction=1.0, pack_nbytes=(64, 64, 128), saved_activation_bytes=192,
    ...                   saved_static_bytes=0, unpacks=3, bytes_at_start=1000, peak_above_start=400,
    ...                   peak_source="test", step_time=0.1)
    >>> t.observed_peak, t.activation_peak, t.num_packs
    (1400, 192, 3)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CompiledTrace"]


@dataclass(frozen=True)
class CompiledTrace:
    """One observed step of a compiled model (the Manager's trace for it).

    `fraction` is the partitioner budget (`activation_memory_budget`) the
    graphs ran with; `pack_nbytes[k]` the storage size of the k-th tensor saved
    for backward (the alignment check of later steps); the saved bytes count
    each storage once, split into activations (what recompute can remove) and
    parameters, buffers and the batch (saved by the graph, but there anyway).
    `observed_peak` is on the Manager's basis: bytes at the step's start
    (parameters, buffers, gradients, the batch) plus the measured growth.
    """

    model: str
    fraction: float
    pack_nbytes: tuple[int, ...]
    saved_activation_bytes: int
    saved_static_bytes: int
    unpacks: int
    bytes_at_start: int
    peak_above_start: int
    peak_source: str
    step_time: float
    graphs: int = 0  # bursts of saves (one per compiled graph; more than one: graph breaks)
    largest_graph_activation_bytes: int = 0  # the most activation bytes one graph saved (offload keeps one's)
    # above the start: the peak had the saves been offloaded; and the gradients tiered; and the split units'
    # parameters; and both ([Note: the what-if of a split step] in runtime/compiled.py); None: not sampled
    whatif_peaks: tuple[int, int, int, int] | None = None
    grad_bytes: int = 0  # gradients the step made

    @property
    def num_packs(self) -> int:
        return len(self.pack_nbytes)

    @property
    def observed_peak(self) -> int:
        """The step's peak on the budget's basis (what `Budget.resolve` reads)."""
        return int(self.bytes_at_start + self.peak_above_start)

    @property
    def activation_peak(self) -> int:
        """Bytes of activations the graphs saved: what '50%act' halves."""
        return int(self.saved_activation_bytes)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pack_nbytes")
        d["packs"] = self.num_packs
        d["observed_peak"] = self.observed_peak
        return d
