callbacks = {}


def _reg(kind):
    def register(fn, *, name=None):
        callbacks.setdefault(kind, []).append(fn)
    return register


on_ui_settings = _reg("ui_settings")
on_cfg_denoiser = _reg("cfg_denoiser")
on_app_started = _reg("app_started")
on_script_unloaded = _reg("script_unloaded")
on_model_loaded = _reg("model_loaded")


def fire(kind, *args):
    for fn in callbacks.get(kind, []):
        fn(*args)


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser
