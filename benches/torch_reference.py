#!/usr/bin/env python3
"""PyTorch reference for `qat-lab bench`: the same CIFAR ResNet (He et al. 2016, option-A shortcuts),
Adam, cross-entropy, random 3x32x32 inputs, timed the same way, in NCHW and channels_last.
Prints `RESULT <name> <train img/s> <eval img/s>` lines. Install: pip install torch (CPU wheels:
pip install torch --index-url <the PyTorch CPU index>), then run `qat-lab bench`."""
import argparse, statistics, time
import torch, torch.nn as nn, torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.b2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        r = F.relu(self.b1(self.c1(x)))
        r = self.b2(self.c2(r))
        s = x
        if self.stride > 1:
            s = s[:, :, ::self.stride, ::self.stride]
        if self.extra > 0:
            s = F.pad(s, (0, 0, 0, 0, 0, self.extra))
        return F.relu(r + s)


class ResNet(nn.Module):
    def __init__(self, depth=20, classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False); self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for stage, cout in enumerate([16, 32, 64]):
            for b in range(n):
                layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1)); cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class Subject:
    """One layout, built and warmed up once, then timed in rounds like `qat-lab bench` does."""

    def __init__(self, fmt, args, dev):
        torch.manual_seed(0)
        self.fmt, self.args = fmt, args
        self.net = ResNet(args.depth).to(dev)
        self.x = torch.randn(args.batch, 3, 32, 32, device=dev)
        if fmt == "channels_last":
            self.net = self.net.to(memory_format=torch.channels_last)
            self.x = self.x.to(memory_format=torch.channels_last)
        self.y = torch.arange(args.batch, device=dev) % 10
        self.opt = torch.optim.Adam(self.net.parameters(), 1e-3)
        self.sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)
        for _ in range(max(args.warmup, 1)):
            self.step()
            self.forward()
        self.sync()

    def step(self):
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(self.x), self.y).backward()
        self.opt.step()

    def forward(self):
        self.net.eval()
        with torch.no_grad():
            self.net(self.x)

    def rate(self, fn, n):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return n * self.args.batch / (time.perf_counter() - t)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128); p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3); p.add_argument("--threads", type=int, default=0)
    p.add_argument("--depth", type=int, default=20); p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    subjects = [Subject(fmt, a, a.device) for fmt in ["nchw", "channels_last"]]
    rates = {s.fmt: ([], []) for s in subjects}
    for _ in range(max(a.rounds, 1)):
        for s in subjects:
            rates[s.fmt][0].append(s.rate(s.step, a.steps))
            rates[s.fmt][1].append(s.rate(s.forward, a.steps * 2))
    for fmt, (train, ev) in rates.items():
        print(f"RESULT torch-{fmt} {statistics.median(train):.1f} {statistics.median(ev):.1f}", flush=True)
