"""memstrata: hierarchical memory management for PyTorch training."""

from .hardware import Hierarchy, Tier, parse_size, profile
from .plan.schema import Plan, StorageDecision, UnitDecision, InfeasibleBudgetError
from .trace.schema import OpRecord, StorageRecord, Trace, UnitRecord

__version__ = "0.1.0"

__all__ = [
    "Hierarchy", "Tier", "profile", "parse_size",
    "Trace", "OpRecord", "StorageRecord", "UnitRecord",
    "Plan", "StorageDecision", "UnitDecision", "InfeasibleBudgetError",
]
