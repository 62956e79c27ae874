"""Train a torchvision model under memstrata's Manager (CPU or CUDA), checked against plain training.

    python examples/manage_training.py            # about 30 s on a 2-core CPU box

Where tensors live: parameters, gradients, optimizer states and the batch stay where you put them; the
tensors autograd saves for backward are kept, copied to host memory or files under `nvme_dir`, or
recomputed, as the plan decides within the budget.  The result is bit-identical to plain training.
"""

import copy
import tempfile

import torch
import torchvision

import memstrata

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = torchvision.models.mobilenet_v3_small(num_classes=10).to(device)
plain = copy.deepcopy(model)
x, y = torch.randn(32, 3, 64, 64, device=device), torch.randint(0, 10, (32,), device=device)


def train(net, mgr=None, steps=4):
    torch.manual_seed(1)  # same dropout masks in both runs
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        ctx = mgr.step(x) if mgr is not None else torch.enable_grad()
        with ctx:  # step 0: warm-up, 1: trace + plan, 2..: under the plan
            torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()


with tempfile.TemporaryDirectory() as nvme_dir:
    mgr = memstrata.Manager(model, nvme_dir=nvme_dir)  # default budget "50%act": keep half the activations
    train(model, mgr)
    train(plain)
    print(mgr.report())
    mgr.close()  # removes the NVMe files

same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
print("bit-identical to plain training:", same)
assert same
