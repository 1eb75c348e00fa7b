"""Stand-in for the built-in Lora extension's ``networks`` module (A1111).

``convert_diffusers_name_to_compvis(key, is_sd2)`` (A1111 v1.10.1
``extensions-builtin/Lora/networks.py:56``), ``sd_model.network_layer_mapping`` (set at
l.122-147, looked up with the converted key at l.206) and ``available_network_aliases``
are real names. Here the conversion only maps the test UNet's kohya names. ``ExtraNetworkLora`` records what
the built-in loader would load (``positional[0]`` is the name, as in
``extensions-builtin/Lora/extra_networks_lora.py:30``)."""

available_network_aliases = {}
available_networks = {}


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename = name, filename


def convert_diffusers_name_to_compvis(key, is_sd2):
    return "diffusion_model_" + key[len("lora_unet_"):] if key.startswith("lora_unet_") else key


class ExtraNetworkLora:
    def __init__(self):
        self.loaded = []  # one list of names per activate call

    def activate(self, p, params_list):
        self.loaded.append([params.positional[0] for params in params_list])
