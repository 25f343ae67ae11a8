"""Fake of modules/extra_networks.py: activation is recorded, nothing is applied."""

activations: list = []


def activate(p, extra_network_data):
    activations.append((p, extra_network_data))


def deactivate(p, extra_network_data):
    pass
