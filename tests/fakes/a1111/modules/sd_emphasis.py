"""Fake of modules/sd_emphasis.py: how token weights act on the encoder output (same math)."""

from __future__ import annotations

import torch


class Emphasis:
    name: str = "Base"
    description: str = ""
    tokens: list[list[int]]
    multipliers: torch.Tensor
    z: torch.Tensor

    def after_transformers(self):
        pass


class EmphasisNone(Emphasis):
    name = "None"


class EmphasisIgnore(Emphasis):
    name = "Ignore"


class EmphasisOriginal(Emphasis):
    """Scale each token by its weight, then restore the chunk's mean."""

    name = "Original"

    def after_transformers(self):
        mean_before = self.z.mean()
        self.z = self.z * self.multipliers.reshape((*self.multipliers.shape, 1)).expand(self.z.shape)
        self.z = self.z * (mean_before / self.z.mean())


class EmphasisOriginalNoNorm(EmphasisOriginal):
    name = "No norm"

    def after_transformers(self):
        self.z = self.z * self.multipliers.reshape((*self.multipliers.shape, 1)).expand(self.z.shape)


options = [EmphasisNone, EmphasisIgnore, EmphasisOriginal, EmphasisOriginalNoNorm]


def get_current_option(emphasis_option_name):
    return next((x for x in options if x.name == emphasis_option_name), EmphasisOriginal)
