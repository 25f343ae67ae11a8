"""Fake of backend/text_processing/emphasis.py: how (word:1.2) multipliers are applied to the hidden states."""

import torch


class Emphasis:
    name = "Base"
    description = ""
    tokens: list
    multipliers: torch.Tensor
    z: torch.Tensor

    def after_transformers(self):
        pass


class EmphasisNone(Emphasis):
    name = "None"


class EmphasisIgnore(Emphasis):
    name = "Ignore"


class EmphasisOriginal(Emphasis):
    name = "Original"

    def after_transformers(self):
        original_mean = self.z.mean()
        self.z = self.z * self.multipliers.reshape((*self.multipliers.shape, 1)).expand(self.z.shape)
        self.z = self.z * (original_mean / self.z.mean())


class EmphasisOriginalNoNorm(EmphasisOriginal):
    name = "No norm"

    def after_transformers(self):
        self.z = self.z * self.multipliers.reshape((*self.multipliers.shape, 1)).expand(self.z.shape)


options = [EmphasisNone, EmphasisIgnore, EmphasisOriginal, EmphasisOriginalNoNorm]


def get_current_option(emphasis_option_name):
    return next((x for x in options if x.name == emphasis_option_name), EmphasisOriginal)
