"""plan — the planners (greedy, milp, forced) behind `plan()`: pure functions from a trace to a `Plan`."""

from ..decisions import InfeasibleBudgetError, Plan, StorageDecision, UnitDecision
from .api import explain_minimum, least_budget_within, minimum_budget, plan
from .forced import KINDS as FORCED_KINDS
from .forced import forced_plan

__all__ = ["plan", "minimum_budget", "least_budget_within", "explain_minimum", "forced_plan", "FORCED_KINDS", "Plan", "StorageDecision", "UnitDecision",
           "InfeasibleBudgetError"]
