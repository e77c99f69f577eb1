#!/usr/bin/env python3
"""PyTorch reference for `qat-lab bench`: the same CIFAR ResNet (He et al. 2016, option-A shortcuts),
Adam, cross-entropy, random 3x32x32 inputs, timed the same way, in NCHW and channels_last; float, and
W4/A4 QAT as qat-lab defines it (../shared/DESIGN.md): weights per output channel on λ = max|W|, layer
inputs per tensor on the batch's max|x| (its moving average in eval), straight-through, first and last
layers at W8/A8, batch norm kept after the quantized convolution (`keep`) or folded into the weights
with the float convolution's batch statistics (`fold`, Jacob et al. 2018: two convolutions). The
fake-quantization is PyTorch's own fused kernels (torch.fake_quantize_per_*_affine). (Its fold quantizes
W·s; qat-lab's op computes s·q(W), equal in value for per-channel scales, so the straight-through
gradient reaches s through W here and through q(W) there: the same work, a timing reference.)
Prints `RESULT <name> <train img/s> <eval img/s>` lines: torch-<layout> for float, and
torch-<config>-<layout> for the QAT configs. Install: pip install torch (CPU wheels: pip install torch
--index-url <the PyTorch CPU index>), then run `qat-lab bench`."""
import argparse, statistics, time
import torch, torch.nn as nn, torch.nn.functional as F


def levels(bits):
    return 2 ** (bits - 1) - 1


def quant_weight(w, bits):
    """Per-output-channel fake-quantization on λ = max|W_o|, straight-through."""
    n = levels(bits)
    s = w.detach().abs().flatten(1).amax(1).div(n).clamp_min(1e-12)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, s, zero, 0, -n, n)


class ActQuant(nn.Module):
    """Per-tensor input fake-quantization: the batch's max|x| in training (and its moving average, as
    qat-lab keeps it), the average in eval; straight-through."""

    def __init__(self, bits, momentum=0.9):
        super().__init__()
        self.n, self.m = levels(bits), momentum
        self.register_buffer("ema", torch.zeros(()))
        self.register_buffer("zero", torch.zeros((), dtype=torch.int32))

    def forward(self, x):
        if self.training:
            s = x.detach().abs().amax()
            self.ema.copy_(torch.where(self.ema > 0, self.m * self.ema + (1 - self.m) * s, s))
        else:
            s = self.ema
        return torch.fake_quantize_per_tensor_affine(x, (s / self.n).clamp_min(1e-12), self.zero, -self.n, self.n)


class ConvBn(nn.Module):
    """3x3 convolution + batch norm; with `bits`, its input and weight quantized and the batch norm
    kept or folded."""

    def __init__(self, cin, cout, stride, bits=None, bn="keep"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.bn = nn.BatchNorm2d(cout)
        self.bits, self.mode = bits, bn
        self.q = ActQuant(bits) if bits else None

    def forward(self, x):
        if not self.bits:
            return self.bn(self.conv(x))
        x, w, stride = self.q(x), self.conv.weight, self.conv.stride
        if self.mode == "keep":
            return self.bn(F.conv2d(x, quant_weight(w, self.bits), None, stride, 1))
        bn = self.bn
        if self.training:
            # The float convolution's batch statistics fold the batch norm (gradients flow through them).
            yf = F.conv2d(x, w, None, stride, 1)
            mean, var = yf.mean((0, 2, 3)), yf.var((0, 2, 3), unbiased=False)
            with torch.no_grad():
                count = yf.numel() / yf.shape[1]
                bn.running_mean.lerp_(mean, bn.momentum)
                bn.running_var.lerp_(var * count / (count - 1), bn.momentum)
        else:
            mean, var = bn.running_mean, bn.running_var
        scale = bn.weight / torch.sqrt(var + bn.eps)
        wq = quant_weight(w * scale.reshape(-1, 1, 1, 1), self.bits)
        return F.conv2d(x, wq, None, stride, 1) + (bn.bias - mean * scale).reshape(1, -1, 1, 1)


class Block(nn.Module):
    def __init__(self, cin, cout, stride, bits=None, bn="keep"):
        super().__init__()
        self.c1 = ConvBn(cin, cout, stride, bits, bn)
        self.c2 = ConvBn(cout, cout, 1, bits, bn)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        r = self.c2(F.relu(self.c1(x)))
        s = x
        if self.stride > 1:
            s = s[:, :, ::self.stride, ::self.stride]
        if self.extra > 0:
            s = F.pad(s, (0, 0, 0, 0, 0, self.extra))
        return F.relu(r + s)


class ResNet(nn.Module):
    """`config`: float, w4a4-fold or w4a4-keep (the stem and the classifier at W8/A8)."""

    def __init__(self, depth=20, classes=10, config="float"):
        super().__init__()
        if config not in ("float", "w4a4-fold", "w4a4-keep"):
            raise ValueError(f"unknown configuration {config!r}")
        quant = config != "float"
        inner, edge, bn = (4, 8, config.split("-")[1]) if quant else (None, None, "keep")
        n = (depth - 2) // 6
        self.stem = ConvBn(3, 16, 1, edge, bn)
        layers, cin = [], 16
        for stage, cout in enumerate([16, 32, 64]):
            for b in range(n):
                layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1, inner, bn)); cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)
        self.fc_q = ActQuant(edge) if quant else None

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x))).mean((2, 3))
        if self.fc_q is None:
            return self.fc(x)
        return F.linear(self.fc_q(x), quant_weight(self.fc.weight, 8), self.fc.bias)


class Subject:
    """One layout, built and warmed up once, then timed in rounds like `qat-lab bench` does."""

    def __init__(self, config, fmt, args, dev):
        torch.manual_seed(0)
        self.name = f"torch-{fmt}" if config == "float" else f"torch-{config}-{fmt}"
        self.fmt, self.args = fmt, args
        self.net = ResNet(args.depth, config=config).to(dev)
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
    p.add_argument("--configs", default="float,w4a4-fold,w4a4-keep")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    subjects = []
    for config in [c for c in a.configs.split(",") if c]:
        for fmt in ["nchw", "channels_last"]:
            try:
                subjects.append(Subject(config, fmt, a, a.device))
            except Exception as e:  # e.g. a PyTorch without the fake-quant kernels: time the rest
                print(f"SKIPPED torch-{config}-{fmt}: {type(e).__name__}: {e}", flush=True)
    rates = {s.name: ([], []) for s in subjects}
    for _ in range(max(a.rounds, 1)):
        for s in subjects:
            rates[s.name][0].append(s.rate(s.step, a.steps))
            rates[s.name][1].append(s.rate(s.forward, a.steps * 2))
    for name, (train, ev) in rates.items():
        print(f"RESULT {name} {statistics.median(train):.1f} {statistics.median(ev):.1f}", flush=True)
