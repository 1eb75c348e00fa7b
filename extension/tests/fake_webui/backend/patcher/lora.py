"""Stand-in for Forge's key map: kohya name → "diffusion_model.<path>.weight"."""


def model_lora_keys_unet(model, key_map):
    for name, _ in model.diffusion_model.named_modules():
        if name:
            key_map["lora_unet_" + name.replace(".", "_")] = f"diffusion_model.{name}.weight"
    return key_map
