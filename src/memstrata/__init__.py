"""memstrata: hierarchical memory management for PyTorch training.

measure (`Hierarchy`, `probe`) -> trace (`trace_model`, `trace_step`, `record_step`)
-> plan (`plan`) -> simulate (`simulate`) -> execute (`Manager`).
"""

from .hardware import Budget, BudgetError, Hierarchy, Tier, format_size, parse_size, profile
from .manager import Manager
from .plan import explain_minimum, forced_plan, least_budget_within, minimum_budget, plan
from .decisions import InfeasibleBudgetError, Plan, PlanError, StorageDecision, UnitDecision
from .runtime.master import MasterWeights
from .simulate import InfeasiblePlanError, Timeline, simulate
from .trace import record_step, trace_model, trace_step
from .trace.schema import OpRecord, StorageRecord, Trace, UnitRecord

__version__ = "0.1.0"

__all__ = [
    "Hierarchy", "Tier", "Budget", "BudgetError", "profile", "parse_size", "format_size",
    "Trace", "OpRecord", "StorageRecord", "UnitRecord", "record_step", "trace_step", "trace_model",
    "Plan", "StorageDecision", "UnitDecision", "PlanError", "InfeasibleBudgetError", "plan", "minimum_budget",
    "least_budget_within", "explain_minimum", "forced_plan",
    "Timeline", "InfeasiblePlanError", "simulate",
    "Manager", "MasterWeights",
]
