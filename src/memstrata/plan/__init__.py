"""plan — decisions (schema) and the planners that make them (greedy, milp) behind `plan()`."""

from ..decisions import InfeasibleBudgetError, Plan, StorageDecision, UnitDecision
from .api import minimum_budget, plan

__all__ = ["plan", "minimum_budget", "Plan", "StorageDecision", "UnitDecision", "InfeasibleBudgetError"]
