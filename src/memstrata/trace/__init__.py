"""trace — record one training step (real device or meta) as a plain-data `Trace`."""

from .record import (
    SAC_HIDDEN_OPS,
    StepRecorder,
    classification_models,
    live_bytes_per_event,
    observed_peak,
    record_step,
    sac_op_indices,
    trace_model,
    trace_step,
)
from .roofline import OpCost, estimate, is_metadata_op, op_cost, roofline_time
from .schema import KINDS, PHASES, OpRecord, StorageRecord, Trace, UnitRecord
from .units import find_units

__all__ = [
    "record_step", "StepRecorder", "trace_step", "trace_model", "classification_models",
    "live_bytes_per_event", "observed_peak", "sac_op_indices", "SAC_HIDDEN_OPS",
    "OpCost", "op_cost", "estimate", "roofline_time", "is_metadata_op",
    "Trace", "OpRecord", "StorageRecord", "UnitRecord", "KINDS", "PHASES", "find_units",
]
