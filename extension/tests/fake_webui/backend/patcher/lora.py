"""Stand-in for Forge's key map: kohya name → "diffusion_model.<path>.weight".

Real signature: ``model_lora_keys_unet(model, key_map={})`` returning the key map
(Forge dfdcbab6 ``backend/patcher/lora.py:43-48``)."""


def model_lora_keys_unet(model, key_map={}):
    for name, _ in model.diffusion_model.named_modules():
        if name:
            key_map["lora_unet_" + name.replace(".", "_")] = f"diffusion_model.{name}.weight"
    return key_map
