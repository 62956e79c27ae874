import copy, json, sys, warnings
import torch, torchvision
from torch import nn
from memstrata import Manager
torch.manual_seed(0)
eager = torchvision.models.resnet18(num_classes=10)
model = copy.deepcopy(eager)
cm = torch.compile(model)
mgr = Manager(cm, budget="50%")
x = torch.randn(16, 3, 96, 96); y = torch.randint(0, 10, (16,))
for step in range(10):
    with mgr.step(x):
        nn.functional.cross_entropy(cm(x), y).backward()
    # eager reference on the same parameters (BN buffers: reset from the managed model before the reference step)
    eager.load_state_dict(model.state_dict())
    eager.zero_grad()
    # the managed step already updated BN running stats; the reference uses train-mode batch stats, so grads comparable
    nn.functional.cross_entropy(eager(x), y).backward()
    rel = max(((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)).item()
              for a, b in zip(model.parameters(), eager.parameters()))
    rt = mgr.report()["steps"][-1]
    print(json.dumps({"step": step, "mode": rt.get("mode"), "max_rel_grad_diff_vs_eager": rel}), flush=True)
    model.zero_grad()
mgr.close()
