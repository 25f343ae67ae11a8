"""Fake of the Lora extension's ``networks`` module (A1111 1.10.1 ``extensions-builtin/Lora/networks.py``,
Forge 2 ``extensions-builtin/sd_forge_lora/networks.py``): the tables a prompt's LoRA name is looked up in,
filled as ``list_available_networks``/``process_network_files`` fill them, and the ``sd_lora`` option
its ``lora_script.py`` registers."""

import os

from modules import shared
from modules.options import OptionInfo
from safetensors import safe_open

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}


class NetworkOnDisk:
    """``network.NetworkOnDisk``: the alias is the file's ``ss_output_name`` (else its name)."""

    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        if os.path.splitext(filename)[1].lower() == ".safetensors":
            with safe_open(filename, framework="pt") as f:  # sd_models.read_metadata_from_safetensors
                self.metadata = f.metadata() or {}
        self.alias = self.metadata.get("ss_output_name", self.name)


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    for root, _dirs, files in os.walk(shared.cmd_opts.lora_dir):
        for file in sorted(files):
            name, ext = os.path.splitext(file)
            if ext.lower() not in (".pt", ".ckpt", ".safetensors"):
                continue
            entry = NetworkOnDisk(name, os.path.join(root, file))
            available_networks[name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry


if "sd_lora" not in shared.opts.data_labels:
    shared.opts.add_option("sd_lora", OptionInfo("None", "Add network to prompt"))
