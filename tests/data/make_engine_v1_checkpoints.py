"""Optimizer checkpoints saved by engine v1 (commit 573c892), for tests/test_engine_v2.py.

    git archive 573c892 src/fullrank | tar -x -C /tmp/v1 && PYTHONPATH=/tmp/v1/src python tests/data/make_engine_v1_checkpoints.py
"""
import torch, fullrank
torch.manual_seed(0)
shapes = [(24, 16), (16, 24), (24, 16), (8,)]
def model():
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
def grads(t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(*s, generator=g) for s in shapes]
out = {}
for name, kw in {"fira": {}, "galore": {}, "adarankgrad": {"max_rank": 6}, "apollo": {}}.items():
    ps = model()
    groups = [{"params": ps[:3], "rank": 4, "update_proj_gap": 3, **({"max_rank": kw["max_rank"]} if kw else {})}, {"params": ps[3:]}]
    opt = fullrank.make_optimizer(name, groups, lr=1e-2)
    for t in range(5):
        for p, g in zip(ps, grads(t)): p.grad = g
        opt.step()
    after5 = [p.detach().clone() for p in ps]
    import copy; sd = copy.deepcopy(opt.state_dict())
    for t in range(5, 8):
        for p, g in zip(ps, grads(t)): p.grad = g
        opt.step()
    out[name] = {"state_dict": sd, "weights_at_5": after5, "weights_at_8": [p.detach().clone() for p in ps]}
torch.save(out, __import__("pathlib").Path(__file__).with_name("engine_v1_checkpoints.pt"))
