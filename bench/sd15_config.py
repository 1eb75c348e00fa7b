"""Write an offline diffusers config folder for SD1.5 (configs only, no
weights): what `from_single_file(ckpt, config=DIR)` needs to read an LDM
SD1 checkpoint without the hub. Values are SD1.5's published configs."""
import json, os, sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))
from make_tokenizer_fixtures import write_vocab  # noqa: E402

out = sys.argv[1]
def dump(rel, obj):
    os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
    json.dump(obj, open(os.path.join(out, rel), "w"), indent=1)

dump("model_index.json", {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
     "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
     "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
     "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
     "vae": ["diffusers", "AutoencoderKL"]})
dump("unet/config.json", {"_class_name": "UNet2DConditionModel", "sample_size": 64,
     "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
     "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
     "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
     "layers_per_block": 2, "norm_num_groups": 32})
dump("vae/config.json", {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
     "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
     "latent_channels": 4, "layers_per_block": 2, "sample_size": 512, "scaling_factor": 0.18215})
dump("text_encoder/config.json", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
     "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
     "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
     "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
dump("scheduler/scheduler_config.json", {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
     "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
     "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"})
tok = os.path.join(out, "tokenizer")
os.makedirs(tok, exist_ok=True)
write_vocab(tok)
t = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
json.dump(t, open(os.path.join(tok, "special_tokens_map.json"), "w"))
json.dump({**t, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"},
          open(os.path.join(tok, "tokenizer_config.json"), "w"))
print("wrote", out)
