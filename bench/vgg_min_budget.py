"""The eight VGGs' minimum feasible budget, and what holds it ([Note: frugal segments] in plan/greedy.py).

Traces each VGG on `meta` (batch 32, 224 px, profile a100-80gb, as bench/all_models_min_budget.py) and prints,
per model: the minimum over the unmanaged peak, the recompute segments the frugal plan uses, and
`explain_minimum`'s line (what is still in tier 0 at the frugal plan's worst event).  Run it with the
memstrata you want to measure on PYTHONPATH:

    PYTHONPATH=src python bench/vgg_min_budget.py > out.jsonl
"""

from __future__ import annotations

import json
import sys

from memstrata.hardware import profile
from memstrata.plan import greedy, minimum_budget
from memstrata.plan.api import explain_minimum, offload_tier_indices
from memstrata.trace import trace_model
from memstrata.trace.index import trace_index

VGGS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")


def main(argv: list[str]) -> int:
    h = profile("a100-80gb")
    for name in argv or VGGS:
        tr = trace_model(name, 32, 224, h)
        ix = trace_index(tr)
        st = greedy.frugal_state(ix, h, offload_tier_indices(h), 2**62)
        segs = [tr.units[a].module + ".." + tr.units[b].module
                for a, b in (ix.span(u) for u in sorted(st.units)) if b > a]
        mb = minimum_budget(tr, h)
        print(json.dumps({"model": name, "peak_bytes": int(tr.observed_peak), "min_bytes": int(mb),
                          "min_over_peak": round(mb / tr.observed_peak, 4), "segments": segs,
                          "why": explain_minimum(tr, h)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
