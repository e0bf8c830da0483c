"""Benchmark models: what DTR is compared on.

Each model is an ``nn.Module`` whose ``forward(*batch)`` returns a scalar loss,
with a main stack of blocks in ``self.blocks`` and a ``ckpt`` attribute that
picks how that stack runs:

- ``None``: plain eager;
- ``"block"``: every block under ``torch.utils.checkpoint`` (use_reentrant=False);
- ``"seq2"`` / ``"seq4"``: ``checkpoint_sequential`` over the stack with 2 or 4
  segments (only where the stack is sequential: ``SEQUENTIAL[name]``).

``build(name, size)`` gives ``(model, batch_fn)``; ``batch_fn(step)`` makes the
inputs of one step deterministically (the same for every variant).
Sizes: ``"full"`` is what the benchmark runs (an eager training step takes about
1 s of CPU time on one thread for GPT, ResNet, U-Net and LSTM, and
0.04 s for the TreeLSTM, whose ten thousand tiny ops per step make dtr's bookkeeping
the whole cost at any larger size; see bench/README.md), ``"quick"`` and ``"tiny"``
are for the quick mode and the tests.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

__all__ = ["build", "MODELS", "SEQUENTIAL", "SIZES", "describe", "param_count"]

MODELS = ["gpt", "resnet", "lstm", "unet", "treelstm"]
# Models whose main stack is a plain chain of single-tensor blocks.
SEQUENTIAL = {"gpt": True, "resnet": True, "lstm": True, "unet": False, "treelstm": False}


def run_stack(blocks: nn.ModuleList, x: torch.Tensor, mode) -> torch.Tensor:
    """Run a chain of blocks eagerly, per-block checkpointed, or as checkpoint_sequential."""
    if mode is None:
        for b in blocks:
            x = b(x)
        return x
    if mode == "block":
        for b in blocks:
            x = checkpoint(b, x, use_reentrant=False)
        return x
    if mode in ("seq2", "seq4"):
        segments = min(int(mode[3:]), len(blocks))
        return checkpoint_sequential(nn.Sequential(*blocks), segments, x, use_reentrant=False)
    raise ValueError(f"unknown checkpoint mode {mode!r}")


# ----------------------------------------------------------------------------
# GPT-style decoder
# ----------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads, p):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.attn_drop = nn.Dropout(p)
        self.resid_drop = nn.Dropout(p)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf"))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class GPTBlock(nn.Module):
    def __init__(self, d, heads, p):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, p)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(p))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, seq, d, layers, heads, p=0.1):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.drop = nn.Dropout(p)
        self.blocks = nn.ModuleList(GPTBlock(d, heads, p) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.ckpt = None

    def forward(self, idx, target):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        x = run_stack(self.blocks, x, self.ckpt)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())


# ----------------------------------------------------------------------------
# ResNet-style CNN with BatchNorm
# ----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self, widths=(32, 64, 128, 256), per_stage=2, classes=100):
        super().__init__()
        blocks: List[nn.Module] = [nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                                 nn.BatchNorm2d(widths[0]), nn.ReLU())]
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(per_stage):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, classes)
        self.ckpt = None

    def forward(self, x, y):
        h = run_stack(self.blocks, x, self.ckpt)
        return F.cross_entropy(self.fc(h.mean(dim=(2, 3))), y)


# ----------------------------------------------------------------------------
# LSTM language model (stack of single-layer LSTMs, one block per layer)
# ----------------------------------------------------------------------------
class LSTMLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lstm = nn.LSTM(d, d, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class LSTMLM(nn.Module):
    def __init__(self, vocab, d, layers):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LSTMLayer(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.ckpt = None

    def forward(self, idx, target):
        h = run_stack(self.blocks, self.emb(idx), self.ckpt)
        return F.cross_entropy(self.head(h).flatten(0, 1), target.flatten())


# ----------------------------------------------------------------------------
# U-Net (skip connections: per-block checkpoint only)
# ----------------------------------------------------------------------------
class DoubleConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
        return self.net(x)


class Up(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    def __init__(self, base=16, depth=4, classes=4):
        super().__init__()
        ch = [base * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(3, ch[0])
        self.down = nn.ModuleList(DoubleConv(ch[i], ch[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(ch[i + 1], ch[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(ch[0], classes, 1)
        self.blocks = nn.ModuleList([self.inc, *self.down, *self.ups])  # what "block" checkpoints
        self.ckpt = None

    def _call(self, block, *args):
        if self.ckpt == "block":
            return checkpoint(block, *args, use_reentrant=False)
        if self.ckpt is not None:
            raise ValueError("U-Net is not a sequential stack")
        return block(*args)

    def forward(self, x, y):
        skips = [self._call(self.inc, x)]
        for d in self.down:
            skips.append(self._call(d, F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for up in self.ups:
            h = self._call(up, h, skips.pop())
        return F.cross_entropy(self.outc(h), y)


# ----------------------------------------------------------------------------
# Child-sum TreeLSTM over random trees (the graph differs every step)
# ----------------------------------------------------------------------------
class TreeCell(nn.Module):
    """One node: x (d,), children's h and c stacked as (k, h) with k >= 0."""

    def __init__(self, d, h):
        super().__init__()
        self.iou = nn.Linear(d + h, 3 * h)
        self.fx = nn.Linear(d, h)
        self.fh = nn.Linear(h, h, bias=False)

    def forward(self, x, ch_h, ch_c):
        hs = ch_h.sum(0)
        i, o, u = self.iou(torch.cat([x, hs])).chunk(3)
        i, o, u = torch.sigmoid(i), torch.sigmoid(o), torch.tanh(u)
        f = torch.sigmoid(self.fx(x).unsqueeze(0) + self.fh(ch_h))  # (k, h)
        c = i * u + (f * ch_c).sum(0)
        return o * torch.tanh(c), c


class TreeLSTM(nn.Module):
    def __init__(self, d, h, classes=5):
        super().__init__()
        self.h = h
        self.cell = TreeCell(d, h)
        self.blocks = nn.ModuleList([self.cell])
        self.out = nn.Linear(h, classes)
        self.ckpt = None

    def forward(self, trees, feats, labels):
        empty = feats[0].new_zeros(0, self.h)
        cell = self.cell

        def node(x, ch_h, ch_c):
            if self.ckpt == "block":
                return checkpoint(cell, x, ch_h, ch_c, use_reentrant=False)
            return cell(x, ch_h, ch_c)

        def run(t, f):
            idx, kids = t
            states = [run(k, f) for k in kids]
            if states:
                ch_h = torch.stack([s[0] for s in states])
                ch_c = torch.stack([s[1] for s in states])
            else:
                ch_h = ch_c = empty
            return node(f[idx], ch_h, ch_c)

        roots = torch.stack([run(t, f)[0] for t, f in zip(trees, feats)])
        return F.cross_entropy(self.out(roots), labels)


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


# ----------------------------------------------------------------------------
# Sizes and builders
# ----------------------------------------------------------------------------
SIZES: Dict[str, Dict[str, dict]] = {
    "full": {
        "gpt": dict(vocab=8192, seq=256, d=384, layers=8, heads=12, batch=2),  # 20.6M parameters
        "resnet": dict(widths=(32, 64, 128, 256), per_stage=2, batch=24, image=64),
        "lstm": dict(vocab=2048, d=256, layers=4, seq=64, batch=80),
        "unet": dict(base=16, depth=4, batch=14, image=128),
        "treelstm": dict(d=128, h=128, trees=2, nodes=48),
    },
    "quick": {
        "gpt": dict(vocab=512, seq=64, d=64, layers=4, heads=4, batch=4),
        "resnet": dict(widths=(8, 16), per_stage=1, batch=8, image=16),
        "lstm": dict(vocab=64, d=32, layers=2, seq=16, batch=4),
        "unet": dict(base=4, depth=2, batch=2, image=16),
        "treelstm": dict(d=16, h=16, trees=2, nodes=8),
    },
}
SIZES["tiny"] = SIZES["quick"]


def build(name: str, size: str = "full", seed: int = 0) -> Tuple[nn.Module, Callable[[int], tuple]]:
    """(model, batch_fn): the model built from ``seed``, and step -> input tuple."""
    cfg = dict(SIZES[size][name])
    torch.manual_seed(seed)
    if name == "gpt":
        batch = cfg.pop("batch")
        m = GPT(**cfg)

        def batch_fn(step):
            g = torch.Generator().manual_seed(1000 + step)
            idx = torch.randint(0, cfg["vocab"], (batch, cfg["seq"] + 1), generator=g)
            return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    elif name == "resnet":
        batch, image = cfg.pop("batch"), cfg.pop("image")
        m = ResNet(**cfg)

        def batch_fn(step):
            g = torch.Generator().manual_seed(1000 + step)
            return (torch.randn(batch, 3, image, image, generator=g),
                    torch.randint(0, 100, (batch,), generator=g))
    elif name == "lstm":
        batch, seq = cfg.pop("batch"), cfg.pop("seq")
        m = LSTMLM(**cfg)

        def batch_fn(step):
            g = torch.Generator().manual_seed(1000 + step)
            idx = torch.randint(0, cfg["vocab"], (batch, seq + 1), generator=g)
            return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    elif name == "unet":
        batch, image = cfg.pop("batch"), cfg.pop("image")
        m = UNet(**cfg)

        def batch_fn(step):
            g = torch.Generator().manual_seed(1000 + step)
            return (torch.randn(batch, 3, image, image, generator=g),
                    torch.randint(0, 4, (batch, image, image), generator=g))
    elif name == "treelstm":
        trees, nodes = cfg.pop("trees"), cfg.pop("nodes")
        m = TreeLSTM(**cfg)

        def batch_fn(step):
            g = torch.Generator().manual_seed(1000 + step)
            rng = random.Random(1000 + step)
            ns = [rng.randint(nodes // 2, nodes * 3 // 2) for _ in range(trees)]
            ts = [random_tree(rng, n) for n in ns]
            feats = [torch.randn(n, cfg["d"], generator=g) for n in ns]
            return ts, feats, torch.randint(0, 5, (trees,), generator=g)
    else:
        raise KeyError(f"unknown model {name!r}; choose from {MODELS}")
    return m, batch_fn


def param_count(name: str, size: str = "full") -> int:
    """Parameters of the model, counted on the meta device (no memory, the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model, _ = build(name, size)
    return sum(p.numel() for p in model.parameters())


def describe(name: str, size: str = "full") -> str:
    cfg = SIZES[size][name]
    n = param_count(name, size)
    return ", ".join(f"{k}={v}" for k, v in cfg.items()) + (
        f"; {n / 1e6:.1f}M parameters" if n >= 100_000 else f"; {n:,} parameters")
