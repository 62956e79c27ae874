"""Plan a GPU training step on a CPU box: trace on the meta device, plan, simulate (nothing is allocated).

    python examples/plan_offline.py               # a few seconds
"""

import memstrata
from memstrata.plan import least_budget_within
from memstrata.simulate import simulate
from memstrata.trace import trace_model

h200 = memstrata.profile("h200")
trace = trace_model("resnet50", 256, 224, profile="h200")  # one step of ResNet-50, batch 256, on meta
budget = trace.observed_peak // 2  # half of the unmanaged peak
plan = memstrata.plan(trace, h200, budget)
timeline = simulate(trace, plan, h200)
print(plan.counts())
print(f"predicted step {timeline.step_time * 1e3:.1f} ms vs unmanaged {trace.step_time * 1e3:.1f} ms "
      f"({timeline.step_time / trace.step_time:.2f}x) at {memstrata.format_size(budget)}")
print("smallest feasible budget:", memstrata.format_size(memstrata.minimum_budget(trace, h200)))
print("least memory within 1.05x:", memstrata.format_size(least_budget_within(trace, h200, 1.05)))
