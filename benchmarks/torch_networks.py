"""Batch norm inside ResNet-18 and MobileNetV2 (eval, ``torch.no_grad()``): PyTorch's BatchNorm2d against
``bn_simd.torch.convert``'s, in one process.

    python benchmarks/torch_networks.py [--rounds 15] [--batches 1 8] [--threads 2] [--json FILE]

Both networks are built here from ``torch.nn`` layers with their standard architectures (torchvision's layer
lists: ResNet-18 of BasicBlocks, MobileNetV2 of inverted residuals with ReLU6), randomly initialised (seeded),
224x224 inputs, float32, in eval mode. For each network, batch size and memory format (NCHW, and channels_last with
the network's weights converted too), the PyTorch model and a deep copy converted with ``bn_simd.torch.convert``
take turns, one forward pass each per round:

* BN time: the sum over the network's batch-norm modules of the time from their forward pre-hook to their forward
  hook (the module's whole call: argument handling, the kernel, the output's allocation), hooks on both models
  alike; the median over rounds. "fastest calls" sums each layer's fastest call over the rounds instead: on a
  machine shared with other processes, the figure least disturbed by them.
* network time: a forward pass of the whole network without hooks; the median and the fastest over rounds.
* network fused: the network time of a third converted copy made with ``convert(model, fuse_activations=True)``,
  whose batch norms also run the ReLU (ReLU6) after them, and ResNet's residual add (no per-BN time: its batch norms
  do more than the others'); the logits column gives both models' differences from PyTorch's.

The table gives each time as median / fastest.

The bound: a third copy of the network whose batch norms are replaced by a same-traffic copy (``x.clone()``: a fresh
output, one read of x and one write of it, one PyTorch call), timed with the same hooks. A batch norm in eval does
exactly that traffic, so ``PyTorch / copy`` is the largest BN speed-up any implementation could show in that cell.

PyTorch runs on ``torch.set_num_threads(2)`` threads and bn_simd on ``bn_simd.set_num_threads(2)`` (``--threads``).
The logits of the two models are compared (max |difference| relative to max |logit|). "others" is the number of cores
that other processes kept busy meanwhile (a shared machine's noise).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bn_simd  # noqa: E402
import bn_simd.torch as bt  # noqa: E402
from benchmarks.harness import machine, timing  # noqa: E402

THREADS = 2


# ---- the networks -------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet's two 3x3 conv-bn pairs around an identity (or 1x1 conv-bn projection) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(num_classes=1000):
    """ResNet-18 (He et al. 2016): 7x7/2 stem, max pool, four stages of two BasicBlocks (64-512 channels)."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def _conv_bn(cin, cout, kernel, stride, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (t > 1), 3x3 depthwise, 1x1 linear projection; residual when shapes
    allow."""

    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = cin * t
        layers = _conv_bn(cin, hidden, 1, 1) if t != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + _conv_bn(hidden, cout, 1, 1, act=False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(num_classes=1000):
    """MobileNetV2 (Sandler et al. 2018), width 1.0: (t, c, n, s) stages from 32 to 320 channels, 1280-wide head."""
    layers = _conv_bn(3, 32, 3, 2)
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)):
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += _conv_bn(cin, 1280, 1, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                           nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)


NETWORKS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def _randomised(model, seed):
    """model with seeded random weights and running statistics, in eval mode (the statistics of a trained network
    are not all 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


# ---- timing -------------------------------------------------------------------------------------------------------

class CopyProbe(nn.Module):
    """A batch norm's memory traffic and nothing else: a fresh output holding a copy of x."""

    def forward(self, x):
        return x.clone()


def copy_probed(model):
    """model with every BatchNorm2d replaced by a CopyProbe (in place)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, CopyProbe())
        else:
            copy_probed(child)
    return model


class BNClock:
    """Forward pre-hooks and hooks on a model's BatchNorm2d (or CopyProbe) modules recording the time spent inside
    each call."""

    def __init__(self, model):
        self.times = []  # per pass: the list of the BN calls' times, in network order
        self._t0 = 0.0
        self.handles = []
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, CopyProbe)):
                self.handles.append(m.register_forward_pre_hook(self._start))
                self.handles.append(m.register_forward_hook(self._stop))

    def new_pass(self):
        self.times.append([])

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output):
        self.times[-1].append(time.perf_counter() - self._t0)

    def remove(self):
        for h in self.handles:
            h.remove()

    def totals(self):
        """(median over passes of the BN time of a pass, sum over layers of each layer's fastest call)."""
        per_layer = list(zip(*self.times))
        return statistics.median(sum(p) for p in self.times), sum(min(v) for v in per_layer)


def measure(name, batch, channels_last, rounds, idle_wait_s):
    """One row: BN and network times (ms) for PyTorch and bn_simd, the logits' difference."""
    torch.manual_seed(0)
    ref = _randomised(NETWORKS[name](), 1)
    ours = bt.convert(copy.deepcopy(ref))
    probe = copy_probed(copy.deepcopy(ref))
    fused = bt.convert(copy.deepcopy(ref), fuse_activations=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref, ours, probe, fused = (m.to(memory_format=fmt) for m in (ref, ours, probe, fused))
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt)
    models = {"torch": ref, "bn_simd": ours, "copy": probe}
    if idle_wait_s:
        timing.wait_until_idle(idle_wait_s)
    with torch.no_grad():
        logits = {k: m(x) for k, m in models.items() if k != "copy"}
        scale = float(logits["torch"].abs().max())
        diff = float((logits["torch"] - logits["bn_simd"]).abs().max()) / scale
        diff_fused = float((logits["torch"] - fused(x)).abs().max()) / scale
        for m in models.values():  # warm-up
            m(x)
        before = timing.cpu_snapshot()
        clocks = {k: BNClock(m) for k, m in models.items()}
        for _ in range(rounds):
            for k, m in models.items():
                clocks[k].new_pass()
                m(x)
        for c in clocks.values():
            c.remove()
        # network times, the fused model's too (its batch norms run the activation: no per-BN clock for it)
        timed = {k: m for k, m in models.items() if k != "copy"}
        timed["fused"] = fused
        net = {k: [] for k in timed}
        for _ in range(rounds):
            for k, m in timed.items():
                t0 = time.perf_counter()
                m(x)
                net[k].append(time.perf_counter() - t0)
        others = timing.other_load(before, timing.cpu_snapshot())
    row = {"network": name, "batch": batch, "format": "channels_last" if channels_last else "NCHW",
           "bn_modules": sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())}
    for k in models:
        row[f"bn {k}"], row[f"bn min {k}"] = (1e3 * v for v in clocks[k].totals())
    for k in net:
        row[f"net {k}"], row[f"net min {k}"] = 1e3 * statistics.median(net[k]), 1e3 * min(net[k])
    row.update({"bn speed-up": row["bn torch"] / row["bn bn_simd"],
                "bn min speed-up": row["bn min torch"] / row["bn min bn_simd"],
                "bound": row["bn torch"] / row["bn copy"], "bound min": row["bn min torch"] / row["bn min copy"],
                "net speed-up": row["net torch"] / row["net bn_simd"], "logits rel diff": diff,
                "fused bn": sum(isinstance(m, bt.BatchNormAct2d) for m in fused.modules()),
                "logits rel diff fused": diff_fused, "others": others})
    return row


def table(rows):
    """The markdown table: each time as median / fastest (ms)."""
    lines = ["| network | batch | memory format | BN PyTorch (ms) | BN bn_simd (ms) | BN speed-up | copy (ms) | "
             "bound: PyTorch / copy | network PyTorch (ms) | network bn_simd (ms) | network fused (ms) | "
             "logits max rel. diff | others (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        others = "?" if r["others"] is None else f"{r['others']:.2f}"
        bn = " | ".join(f"{r[f'bn {k}']:.2f} / {r[f'bn min {k}']:.2f}" for k in ("torch", "bn_simd"))
        net = " | ".join(f"{r[f'net {k}']:.1f} / {r[f'net min {k}']:.1f}" for k in ("torch", "bn_simd", "fused"))
        lines.append(f"| {r['network']} ({r['bn_modules']} BN) | {r['batch']} | {r['format']} | {bn} | "
                     f"{r['bn speed-up']:.2f}x / {r['bn min speed-up']:.2f}x | "
                     f"{r['bn copy']:.2f} / {r['bn min copy']:.2f} | {r['bound']:.2f}x / {r['bound min']:.2f}x | "
                     f"{net} ({r['fused bn']} fused) | {r['logits rel diff']:.1e} / {r['logits rel diff fused']:.1e} | "
                     f"{others} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="forward passes per model and measurement (default 15)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=THREADS, help=f"threads of each library (default {THREADS})")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--wait-idle", "--idle-wait", dest="idle_wait", type=float, default=20.0,
                   help="before each row, wait at most this many seconds for other processes to leave the CPUs idle")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bn_simd.set_num_threads(args.threads)
    print(f"# {machine.describe()}; torch {torch.__version__}, {args.threads} threads each; bn_simd "
          f"{bn_simd.__version__} ({bn_simd.get_isa()})", flush=True)
    rows = []
    for name in args.networks:
        for batch in args.batches:
            for cl in (False, True):
                r = measure(name, batch, cl, args.rounds, args.idle_wait)
                rows.append(r)
                others = "" if r["others"] is None else f", others {r['others']:.2f} cores"
                print(f"{name} batch {batch} {r['format']}: BN {r['bn torch']:.2f} -> {r['bn bn_simd']:.2f} ms "
                      f"({r['bn speed-up']:.2f}x; copy {r['bn copy']:.2f} ms, bound {r['bound']:.2f}x), "
                      f"network {r['net torch']:.1f} -> {r['net bn_simd']:.1f} ms, fused {r['net fused']:.1f} ms"
                      f"{others}", flush=True)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
