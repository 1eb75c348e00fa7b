"""Stand-in for the built-in Lora extension's ``networks`` module (A1111)."""

available_network_aliases = {}
available_networks = {}


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename = name, filename


def convert_diffusers_name_to_compvis(key, is_sd2):
    return "diffusion_model_" + key[len("lora_unet_"):] if key.startswith("lora_unet_") else key
