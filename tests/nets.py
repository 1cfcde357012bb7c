"""Small models the tests share: each stands for a family of real models with one property."""

import torch
from torch import nn


class RotaryTokens(nn.Module):
    """A ViT-like net whose blocks all use one table computed from the patch grid and a buffer
    (DeepSeek's and Qwen3's ViTs build their rotary tables so). ``table_from`` makes the table
    from a trainable parameter, adds noise or writes into it instead: then it must not be recomputed."""

    def __init__(self, table_from="buffer", depth=4, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        frequencies = torch.linspace(0.1, 1.0, dim // 2)
        if table_from == "parameter":
            self.frequencies = nn.Parameter(frequencies)
        else:
            self.register_buffer("frequencies", frequencies)
        self.table_from = table_from
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x)
        rows, cols = x.shape[-2], x.shape[-1]
        grid = torch.arange(rows * cols, dtype=torch.float32)
        angles = grid[:, None] * self.frequencies[None, :]
        table = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (tokens, dim)
        if self.table_from == "noise":
            table = table + torch.rand(table.shape)
        if self.table_from == "written":
            table.mul_(2.0)
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block(x * table)
        return self.head(x.mean(1))


def rotary_tokens_with_learned_frequencies() -> RotaryTokens:
    """A model factory for the CLI (``nets:rotary_tokens_with_learned_frequencies``)."""
    return RotaryTokens("parameter")


class TwoBranches(nn.Module):
    """Two token streams side by side, each block mixing one into the other (CrossViT's shape):
    no point between blocks leaves a single tensor live."""

    def __init__(self, depth=4, dim=8):
        super().__init__()
        self.embed = nn.ModuleList([nn.Linear(12, dim), nn.Linear(12, dim)])
        self.blocks = nn.ModuleList(CrossBlock(dim) for _ in range(depth))
        self.head = nn.Linear(2 * dim, 5)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, 16, 12) from (B, 12, 4, 4)
        xs = [self.embed[0](tokens), self.embed[1](tokens)]
        for block in self.blocks:
            xs = block(xs)
        return self.head(torch.cat([xs[0].mean(1), xs[1].mean(1)], dim=-1))


class CrossBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.own = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim)])
        self.mix = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim)])

    def forward(self, xs):
        a = xs[0] + torch.relu(self.own[0](xs[0]))
        b = xs[1] + torch.relu(self.own[1](xs[1]))
        return [a + self.mix[0](b), b + self.mix[1](a)]
