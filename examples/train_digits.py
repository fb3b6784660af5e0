"""Batch normalization in a NumPy training loop: an MLP and a small CNN on scikit-learn's bundled digits
(1797 8x8 images; no download), each trained with and without bn_simd's BatchNorm layers at several learning
rates. Prints, per run, the epochs to 95 % test accuracy and the final accuracy, and writes a PNG of the
learning curves when matplotlib is installed.

    python examples/train_digits.py              # the full table (well under a minute on 2 cores)
    python examples/train_digits.py --quick      # a few seconds: fewer epochs and learning rates

Needs scikit-learn (for ``sklearn.datasets.load_digits``: ``pip install scikit-learn``); matplotlib is optional.

Everything but the batch norm is written here in NumPy: linear layers, 3x3 convolutions as one matrix product
over im2col patches, ReLU, average pooling, softmax cross-entropy, plain SGD. The BN layers are
``bn_simd.BatchNorm1d`` (after each hidden linear layer) and ``bn_simd.BatchNorm2d`` (after each conv), called
forward and ``.backward(grad)``; their ``weight``/``bias`` are trained with the rest (``grad_weight``,
``grad_bias``). The runs with and without BN start from the same seeded weights.
"""
import argparse
import os
import sys
import time

# The matrices here are small (at most 2048 x 144): one BLAS thread is faster than waking a pool, and much faster
# on a machine whose cores are busy. Set before NumPy loads its BLAS; a value you set wins.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

try:
    import bn_simd
except ImportError:  # run from a source checkout without installing: the repository root holds bn_simd/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bn_simd

DTYPE = np.float32


# ---- layers: forward(x, training) caches what backward(g) needs; params() yields (value, gradient) pairs ---------

class Linear:
    def __init__(self, n_in, n_out, rng):
        self.W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(DTYPE)   # He initialisation
        self.b = np.zeros(n_out, DTYPE)

    def forward(self, x, training):
        self.x = x
        return x @ self.W + self.b

    def backward(self, g):
        self.gW, self.gb = self.x.T @ g, g.sum(0)
        return g @ self.W.T

    def params(self):
        return [(self.W, self.gW), (self.b, self.gb)]


class Conv3x3:
    """3x3 convolution, stride 1, zero padding 1, NCHW: out = patches @ W with patches (N*H*W, C*9)."""

    def __init__(self, c_in, c_out, rng):
        self.W = (rng.standard_normal((c_in * 9, c_out)) * np.sqrt(2.0 / (c_in * 9))).astype(DTYPE)
        self.b = np.zeros(c_out, DTYPE)

    def forward(self, x, training):
        N, C, H, W = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        taps = [xp[:, :, i:i + H, j:j + W] for i in range(3) for j in range(3)]
        self.cols = np.stack(taps, axis=-1).transpose(0, 2, 3, 1, 4).reshape(N * H * W, C * 9)  # (c, tap) order
        self.shape = x.shape
        out = self.cols @ self.W + self.b
        return out.reshape(N, H, W, -1).transpose(0, 3, 1, 2)

    def backward(self, g):
        N, C, H, W = self.shape
        g2 = g.transpose(0, 2, 3, 1).reshape(N * H * W, -1)
        self.gW, self.gb = self.cols.T @ g2, g2.sum(0)
        dcols = (g2 @ self.W.T).reshape(N, H, W, C, 9).transpose(0, 3, 4, 1, 2)   # (N, C, tap, H, W)
        dxp = np.zeros((N, C, H + 2, W + 2), DTYPE)
        for t in range(9):   # col2im: each tap's patch gradient goes back to the pixels it read
            i, j = divmod(t, 3)
            dxp[:, :, i:i + H, j:j + W] += dcols[:, :, t]
        return dxp[:, :, 1:-1, 1:-1]

    def params(self):
        return [(self.W, self.gW), (self.b, self.gb)]


class ReLU:
    def forward(self, x, training):
        self.mask = x > 0
        return x * self.mask

    def backward(self, g):
        return g * self.mask

    def params(self):
        return []


class AvgPool2:
    def forward(self, x, training):
        N, C, H, W = x.shape
        return x.reshape(N, C, H // 2, 2, W // 2, 2).mean(axis=(3, 5))

    def backward(self, g):
        return np.repeat(np.repeat(g, 2, axis=2), 2, axis=3) * DTYPE(0.25)

    def params(self):
        return []


class Flatten:
    def forward(self, x, training):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, g):
        return g.reshape(self.shape)

    def params(self):
        return []


class BN:
    """bn_simd.BatchNorm1d / BatchNorm2d: batch statistics in training (running ones updated), running in eval."""

    def __init__(self, layer):
        self.layer = layer

    def forward(self, x, training):
        self.layer.train(training)
        return self.layer(x)

    def backward(self, g):
        gx = self.layer.backward(g)
        return gx

    def params(self):
        return [(self.layer.weight, self.layer.grad_weight), (self.layer.bias, self.layer.grad_bias)]


def mlp(bn, rng):
    """64 -> 4 hidden layers of 128 (Linear, [BatchNorm1d], ReLU) -> 10."""
    layers = []
    for n_in in (64, 128, 128, 128):
        layers.append(Linear(n_in, 128, rng))
        layers += [BN(bn_simd.BatchNorm1d(128))] if bn else []
        layers.append(ReLU())
    return layers + [Linear(128, 10, rng)]


def cnn(bn, rng):
    """(1, 8, 8) -> conv 8 -> conv 16 (each Conv3x3, [BatchNorm2d], ReLU) -> 2x2 average pool -> 10."""
    layers = []
    for c_in, c_out in ((1, 8), (8, 16)):
        layers.append(Conv3x3(c_in, c_out, rng))
        layers += [BN(bn_simd.BatchNorm2d(c_out))] if bn else []
        layers.append(ReLU())
    return layers + [AvgPool2(), Flatten(), Linear(16 * 4 * 4, 10, rng)]


# ---- training -----------------------------------------------------------------------------------------------------

def forward(layers, x, training):
    for layer in layers:
        x = layer.forward(x, training)
    return x


def loss_and_grad(logits, y):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))
    p[np.arange(len(y)), y] -= 1
    return loss, p / len(y)


def accuracy(layers, x, y):
    return float(np.mean(forward(layers, x, training=False).argmax(axis=1) == y))


def train(make, bn, lr, data, epochs, batch, seed):
    """Test accuracy after each epoch; the list stops early (diverged=True) when the loss leaves the finite range."""
    x_tr, y_tr, x_te, y_te = data
    rng = np.random.default_rng(seed)
    layers = make(bn, np.random.default_rng(seed))   # the same initial weights with and without BN
    curve = []
    for _ in range(epochs):
        order = rng.permutation(len(y_tr))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            with np.errstate(all="ignore"):
                loss, g = loss_and_grad(forward(layers, x_tr[idx], training=True), y_tr[idx])
                if not np.isfinite(loss) or loss > 1e3:
                    return curve, True
                for layer in reversed(layers):
                    g = layer.backward(g.astype(DTYPE))
                for layer in layers:
                    for value, grad in layer.params():
                        value -= DTYPE(lr) * grad
        with np.errstate(all="ignore"):
            curve.append(accuracy(layers, x_te, y_te))
    return curve, False


def load(cnn_input):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("train_digits.py needs scikit-learn for its bundled digits data set: pip install scikit-learn")
    digits = load_digits()
    x = (digits.data / 16.0).astype(DTYPE)
    y = digits.target
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    te, tr = order[:n_test], order[n_test:]
    shape = (-1, 1, 8, 8) if cnn_input else (-1, 64)
    return x[tr].reshape(shape), y[tr], x[te].reshape(shape), y[te]


def epochs_to(curve, target):
    hits = [e + 1 for e, acc in enumerate(curve) if acc >= target]
    return hits[0] if hits else None


def plot(results, lrs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no PNG of the learning curves (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, model in zip(axes, ("MLP", "CNN")):
        for k, lr in enumerate(lrs):
            for bn, style in ((False, "--"), (True, "-")):
                curve, diverged = results[model, bn, lr]
                label = f"lr {lr} {'BN' if bn else 'plain'}" + (" (diverged)" if diverged else "")
                ax.plot(range(1, len(curve) + 1), curve, style, color=colors[k % len(colors)], label=label)
                if diverged:   # the epoch in which the loss overflowed
                    ax.plot([len(curve) + 1], [0.0], "x", color=colors[k % len(colors)], ms=8)
        ax.axhline(0.95, color="gray", lw=0.5)
        ax.set_title(f"{model} on digits: test accuracy")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"learning curves: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs and learning rates (a few seconds)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10; 3 with --quick)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates (default 0.05 0.2 0.5 1.0)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--png", default="train_digits.png", help="where the learning curves go (needs matplotlib)")
    p.add_argument("--no-png", action="store_true", help="do not write the PNG")
    args = p.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 10)
    lrs = args.lrs or ([0.05, 1.0] if args.quick else [0.05, 0.2, 0.5, 1.0])
    data = {"MLP": load(False), "CNN": load(True)}
    t0 = time.perf_counter()
    results = {}
    print(f"digits: {len(data['MLP'][1])} training and {len(data['MLP'][3])} test images; SGD, batch {args.batch}, "
          f"{epochs} epochs; test accuracy after each epoch")
    print(f"{'model':5} {'lr':>5} | {'plain: epochs to 95%':>20} {'final acc %':>11} | {'BN: epochs to 95%':>17} "
          f"{'final acc %':>11}")
    for model, make in (("MLP", mlp), ("CNN", cnn)):
        for lr in lrs:
            row = []
            for bn in (False, True):
                curve, diverged = results[model, bn, lr] = train(make, bn, lr, data[model], epochs, args.batch,
                                                                   args.seed)
                e = epochs_to(curve, 0.95)
                row.append(f"{'-' if e is None else e:>{17 if bn else 20}} "
                           f"{'diverged' if diverged else f'{100 * curve[-1]:.2f}':>11}")
            print(f"{model:5} {lr:>5} | {row[0]} | {row[1]}")
    # what the table shows, from the numbers above
    for model in ("MLP", "CNN"):
        faster = [lr for lr in lrs if (epochs_to(results[model, True, lr][0], 0.95) or epochs + 1)
                  < (epochs_to(results[model, False, lr][0], 0.95) or epochs + 1)]
        # failed: the loss overflowed (diverged), or the net ended at chance level or below 50 % (collapsed)
        fail = {bn: [lr for lr in lrs if results[model, bn, lr][1] or results[model, bn, lr][0][-1] < 0.5]
                for bn in (False, True)}
        print(f"{model}: BN reached 95 % in fewer epochs at lr {faster or 'none'} (of {lrs}); failed to train "
              f"(diverged, or final accuracy < 50 %) without BN at lr {fail[False] or 'none'}, with BN at lr "
              f"{fail[True] or 'none'}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    if not args.no_png:
        plot(results, lrs, args.png)


if __name__ == "__main__":
    main()
