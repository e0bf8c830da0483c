"""Small models for the differential tests, each with a way to make inputs."""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d=32, depth=6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x).pow(2).mean()


class CNN(nn.Module):
    """Conv + BatchNorm + in-place ReLU, with a residual add."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c, 10)

    def forward(self, x, y):
        h = self.relu(self.bn1(self.conv1(x)))
        h2 = self.bn2(self.conv2(h))
        h2 += h
        h = self.relu(h2)
        h = F.max_pool2d(h, 2)
        h = h.mean(dim=(2, 3))
        return F.cross_entropy(self.fc(h), y)


class TransformerBlock(nn.Module):
    def __init__(self, d=32, heads=4, p=0.1, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=p, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(p), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(d, vocab)

    def forward(self, tokens, target):
        x = self.emb(tokens)
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + self.drop(a)
        x = x + self.drop(self.ff(self.ln2(x)))
        return F.cross_entropy(self.out(x).flatten(0, 1), target.flatten())


class LSTMModel(nn.Module):
    def __init__(self, d=16, hidden=24):
        super().__init__()
        self.lstm = nn.LSTM(d, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, 1)

    def forward(self, x, y):
        out, _ = self.lstm(x)
        return F.mse_loss(self.fc(out[:, -1]), y)


class TreeLSTM(nn.Module):
    """Child-sum TreeLSTM over a random binary tree: the graph differs per input."""

    def __init__(self, d=16, h=16):
        super().__init__()
        self.h = h
        self.iou = nn.Linear(d + h, 3 * h)
        self.f = nn.Linear(d + h, h)
        self.fc = nn.Linear(h, 1)

    def node(self, x, children):
        if children:
            hs = torch.stack([c[0] for c in children]).sum(0)
        else:
            hs = x.new_zeros(self.h)
        xh = torch.cat([x, hs])
        i, o, u = self.iou(xh).chunk(3)
        i, o, u = torch.sigmoid(i), torch.sigmoid(o), torch.tanh(u)
        c = i * u
        for ch_h, ch_c in children:
            f = torch.sigmoid(self.f(torch.cat([x, ch_h])))
            c = c + f * ch_c
        return o * torch.tanh(c), c

    def forward(self, tree, feats):
        def run(t):
            idx, kids = t
            return self.node(feats[idx], [run(k) for k in kids])

        h, _ = run(tree)
        return self.fc(h).pow(2).sum()


def random_tree(rng: random.Random, n: int):
    """A random binary tree over node ids 0..n-1, as (id, [children])."""
    ids = list(range(n))
    rng.shuffle(ids)

    def build(lo, hi):
        if lo >= hi:
            return None
        mid = rng.randrange(lo, hi)
        kids = [k for k in (build(lo, mid), build(mid + 1, hi)) if k is not None]
        return (ids[mid], kids)

    return build(0, n)


def make(name: str, seed: int = 0):
    """(model, list of per-step input tuples)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "mlp":
        m = MLP()
        data = [(torch.randn(128, 32, generator=g),) for _ in range(3)]
    elif name == "cnn":
        m = CNN()
        data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
                for _ in range(3)]
    elif name == "transformer":
        m = TransformerBlock()
        data = [(torch.randint(0, 50, (2, 12), generator=g), torch.randint(0, 50, (2, 12), generator=g))
                for _ in range(3)]
    elif name == "lstm":
        m = LSTMModel()
        data = [(torch.randn(3, 10, 16, generator=g), torch.randn(3, 1, generator=g)) for _ in range(3)]
    elif name == "treelstm":
        m = TreeLSTM()
        rng = random.Random(seed)
        data = []
        for n in (7, 11, 5):
            data.append((random_tree(rng, n), torch.randn(n, 16, generator=g)))
    else:
        raise KeyError(name)
    return m, data


MODELS = ["mlp", "cnn", "transformer", "lstm", "treelstm"]
