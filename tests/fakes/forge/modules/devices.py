"""Fake of modules/devices.py (Forge): ``autocast()`` is a null context; CPU device."""

import contextlib

import torch

device = cpu = torch.device("cpu")
dtype = torch.float16


def autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass
