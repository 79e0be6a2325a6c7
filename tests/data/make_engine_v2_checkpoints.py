"""Write tests/data/engine_v2_checkpoints.pt with the engine of commit 851c590 (same layout as v1's):
    git worktree add ../old 851c590 && PYTHONPATH=../old/src python tests/data/make_engine_v2_checkpoints.py tests/data/engine_v2_checkpoints.pt"""
import copy
import sys

import torch

import fullrank

shapes = [(24, 16), (16, 24), (24, 16), (8,)]
out = {}
for method in ("fira", "galore", "adarankgrad", "apollo"):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in shapes]
    extra = {"max_rank": 6} if method == "adarankgrad" else {}
    opt = fullrank.make_optimizer(method, [{"params": params[:3], "rank": 4, "update_proj_gap": 3, **extra},
                                           {"params": params[3:]}], lr=1e-2)
    record = {}
    for t in range(8):
        g = torch.Generator().manual_seed(100 + t)
        for p, s in zip(params, shapes):
            p.grad = torch.randn(*s, generator=g)
        opt.step()
        if t == 4:
            record["weights_at_5"] = [p.detach().clone() for p in params]
            record["state_dict"] = copy.deepcopy(opt.state_dict())  # (its tensors are the live state)
    record["weights_at_8"] = [p.detach().clone() for p in params]
    out[method] = record
torch.save(out, sys.argv[1])
