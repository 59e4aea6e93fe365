"""Forward (batch 2, no grad) and training-step time of the network variants at the default
grid 24x48x48, 2 threads: `python bench/default_grid_variants.py` (prints one line per variant)."""

import time

import torch

from lungreg.network.model import ModelSettings, RegistrationNet

torch.set_num_threads(2)
shape = (24, 48, 48)
for kw in [
    dict(width=1.0),
    dict(width=1.0, feature_reduction=32, deformable_stride=2),
    dict(width=0.25),
    dict(width=0.25, feature_reduction=16, deformable_stride=2),
    dict(width=0.5, feature_reduction=32, deformable_stride=2),
]:
    net = RegistrationNet(ModelSettings(**kw))
    m = torch.rand(2, 1, *shape)
    f = torch.rand(2, 1, *shape)
    opt = torch.optim.Adam(net.parameters())
    with torch.no_grad():
        net(m, f)
        t = time.perf_counter()
        for _ in range(3):
            net(m, f)
        fw = (time.perf_counter() - t) / 3
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        o = net(m, f)
        loss = ((o.warped - f) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t)
    print(kw, "fwd batch2 %.3f s  step %.3f s" % (fw, sorted(ts)[1]), flush=True)
