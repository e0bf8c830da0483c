"""The training run that setup.py profiles the C++ runtime with (Note [Profile-guided build] in setup.py).

    python csrc/pgo_workload.py [PACKAGE_DIR]   # checks dtr is imported from PACKAGE_DIR

Small models that reach the runtime's common paths: recorded functional ops,
views, in-place ops, BatchNorm's running statistics, dropout's RNG, tensor
lists, escapes, and the backward pass; each for a few steps with no limit,
then at 0.5, 0.7 and 0.9 of its peak, where values are evicted and recomputed
(and a budget too small raises). A few seconds on one core.
What it computes is not checked: the test suite does that.
"""
from __future__ import annotations

import os
import random
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import dtr


class TreeCell(nn.Module):
    """A binary TreeLSTM cell: dynamic structure, many small ops."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.iou = nn.Linear(d + h, 3 * h)
        self.f = nn.Linear(d + h, h)

    def forward(self, x, kids):
        if kids:
            hs = torch.stack([k[0] for k in kids])
            cs = torch.stack([k[1] for k in kids])
            h_sum = hs.sum(0)
        else:
            h_sum = x.new_zeros(self.f.out_features)
            cs = None
        i, o, u = self.iou(torch.cat([x, h_sum])).chunk(3)
        c = torch.sigmoid(i) * torch.tanh(u)
        if cs is not None:
            xs = x.unsqueeze(0).expand(cs.shape[0], -1)
            f = torch.sigmoid(self.f(torch.cat([xs, hs], dim=1)))
            c = c + (f * cs).sum(0)
        return torch.sigmoid(o) * torch.tanh(c), c


def random_tree(rng: random.Random, lo: int, hi: int):
    if lo >= hi:
        return None
    mid = rng.randrange(lo, hi)
    kids = [k for k in (random_tree(rng, lo, mid), random_tree(rng, mid + 1, hi)) if k is not None]
    return mid, kids


class TreeModel(nn.Module):
    def __init__(self, d=32, h=32, nodes=200):
        super().__init__()
        self.cell = TreeCell(d, h)
        self.out = nn.Linear(h, 5)
        self.tree = random_tree(random.Random(0), 0, nodes)
        self.feats = torch.randn(nodes, d)

    def forward(self):
        def run(t):
            idx, kids = t
            return self.cell(self.feats[idx], [run(k) for k in kids])

        return F.cross_entropy(self.out(run(self.tree)[0]).view(1, -1), torch.tensor([1]))


class ConvNet(nn.Module):
    """Convolutions, BatchNorm (hidden running-stat writes), in-place ReLU, dropout."""

    def __init__(self):
        super().__init__()
        layers = [nn.Conv2d(3, 16, 3, padding=1)]
        for _ in range(5):
            layers += [nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1)]
        self.body = nn.Sequential(*layers, nn.Dropout(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 10))
        self.x = torch.randn(8, 3, 32, 32)
        self.y = torch.randint(0, 10, (8,))

    def forward(self):
        return F.cross_entropy(self.body(self.x), self.y)


class Attention(nn.Module):
    """A causal self-attention block: matmuls, reshapes, transposes, masking, softmax."""

    def __init__(self, d=32, heads=4, seq=128):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.x = torch.randn(4, seq, d)
        self.mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)

    def forward(self):
        b, t, d = self.x.shape
        h = self.norm(self.x)
        q, k, v = self.qkv(h).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5
        att = F.dropout(att.masked_fill(self.mask, float("-inf")).softmax(-1), 0.1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, d)
        return (self.x + self.proj(y)).pow(2).mean()


def add_chain(n: int = 3000) -> None:
    a = torch.randn(16, 16, requires_grad=True)
    b = torch.randn(16, 16)
    with dtr.budget(None, runtime="cpp"):
        y = a + b
        for _ in range(n):
            y = y + b
        y.sum().backward()


def train(model: nn.Module, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with dtr.budget(None, runtime="cpp") as session:
        model().backward()
    peak = session.stats.peak_bytes
    for budget in [None] * steps + [int(peak * f) for f in (0.5, 0.7, 0.9)]:
        opt.zero_grad(set_to_none=True)
        try:
            with dtr.budget(budget, runtime="cpp"):
                loss = model()
                loss.backward()
        except dtr.BudgetExceededError:
            continue  # parameters are untouched; the next, larger budget retries the step
        loss.item()
        opt.step()


def main() -> None:
    import dtr._C

    if len(sys.argv) > 1:  # setup.py's run: the instrumented build must be the one imported
        for module in (dtr, dtr._C):
            if not os.path.abspath(module.__file__).startswith(os.path.abspath(sys.argv[1]) + os.sep):
                raise SystemExit(f"pgo_workload: imported {module.__name__} from {module.__file__}, "
                                 f"not from {sys.argv[1]}")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for _ in range(3):
        add_chain()
    train(TreeModel(), steps=4)
    train(ConvNet(), steps=4)
    train(Attention(), steps=4)


if __name__ == "__main__":
    main()
