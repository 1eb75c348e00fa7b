"""A stand-in for ``modules.processing``: the fields the extension reads or writes,
the order in which a job calls the scripts, and how the infotext is built.
Our own code; each step cites the real one (A1111 v1.10.1 ``modules/processing.py``,
Forge dfdcbab6 line in brackets).
"""

from modules import extra_networks


class StableDiffusionProcessing:
    def __init__(self, prompts, batch_size, sd_model, hr_prompts=None, scripts=None, n_iter=None):
        self.all_prompts = list(prompts)
        self.all_hr_prompts = list(hr_prompts) if hr_prompts else []
        self.enable_hr = bool(hr_prompts)
        self.prompt = self.all_prompts[0]
        self.batch_size = batch_size
        self.n_iter = n_iter or (len(prompts) + batch_size - 1) // batch_size
        self.iteration = 0
        self.sd_model = sd_model
        self.extra_generation_params = {}
        self.is_hr_pass = False
        self.prompts = []
        self.hr_prompts = []
        self.extra_network_data = {}
        self.hr_extra_network_data = {}
        self.scripts = scripts
        self.script_args = scripts.script_args if scripts is not None else ()
        self.all_seeds = list(range(len(self.all_prompts)))
        self.seeds = []
        self.steps = 2
        if self.enable_hr:
            # StableDiffusionProcessingTxt2Img.init, A1111 l.1267-1275 [1299-...]: the
            # "Hires prompt" infotext value reads p.all_hr_prompts[index] and is written
            # only when it differs from the image's prompt.
            def get_hr_prompt(p, index, prompt_text, **kwargs):
                hr_prompt = p.all_hr_prompts[index]
                return hr_prompt if hr_prompt != prompt_text else None

            self.extra_generation_params["Hires prompt"] = get_hr_prompt

    def start_batch(self, n):
        """``p.iteration = n`` (l.933 [925]) and the batch's prompts (l.943 [938])."""
        self.iteration = n
        self.prompts = self.all_prompts[n * self.batch_size:(n + 1) * self.batch_size]
        self.seeds = self.all_seeds[n * self.batch_size:(n + 1) * self.batch_size]
        return self.prompts

    def parse_extra_network_prompts(self):
        """l.508-509 and, for txt2img with hires, l.1544-1551 [1624-1631]: the hires
        prompts of the batch are sliced from ``all_hr_prompts`` *now*, after
        ``before_process_batch``, and parsed into ``hr_extra_network_data``."""
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        if self.enable_hr:
            self.hr_prompts = self.all_hr_prompts[self.iteration * self.batch_size:(self.iteration + 1) * self.batch_size]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    """l.705-...: ``index`` defaults to ``position_in_batch + iteration * batch_size``
    (l.753); list values are indexed with ``index`` and callables are called with
    ``**locals()`` (l.803-807 [783-787]). Returns ``{key: text}`` (the real one joins
    them into a string) plus the prompt."""
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    prompt_text = all_prompts[index]
    generation_params = dict(p.extra_generation_params)
    for key, value in generation_params.items():
        if isinstance(value, list):
            generation_params[key] = value[index]
        elif callable(value):
            generation_params[key] = value(**locals())
    return prompt_text, {k: v for k, v in generation_params.items() if v is not None}


class Processed:
    def __init__(self, p, images, infotexts):
        self.images, self.infotexts = images, infotexts
        self.all_prompts = p.all_prompts
        self.batch_size = p.batch_size

    def infotext(self, p, index):
        """l.609-610 [612-613]: the job's prompts and a job index."""
        return create_infotext(p, self.all_prompts, None, None, position_in_batch=index % self.batch_size,
                               iteration=index // self.batch_size)


def process_images(p, sample):
    """The order of ``process_images_inner`` and ``StableDiffusionProcessingTxt2Img.sample``.
    ``sample(p, x)`` stands for the sampler (it runs the UNet through the test's
    CFG emulation) and returns the batch's latents."""
    import torch

    p.scripts.process(p)  # l.915 [907]
    images, infotexts = [], []
    for n in range(p.n_iter):
        p.start_batch(n)
        p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=[])  # l.952 [947]
        p.parse_extra_network_prompts()  # l.957 [952]
        extra_networks.activate(p, p.extra_network_data)  # l.961 [955]
        p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=[])  # l.964 [960]
        g = torch.Generator().manual_seed(1000 + n)
        x = torch.randn(len(p.prompts), 8, 4, 4, generator=g)
        p.scripts.process_before_every_sampling(p=p, x=x, noise=x, c=None, uc=None)  # l.1338-1344 [1377]
        samples = sample(p, x)
        if p.enable_hr:  # sample_hr_pass, l.1364-1463 [1434-1539]
            p.is_hr_pass = True  # l.1368
            extra_networks.activate(p, p.hr_extra_network_data)  # l.1437 [1503]
            p.scripts.process_before_every_sampling(p=p, x=samples, noise=samples, c=None, uc=None)  # l.1446 [1510, 1522]
            samples = sample(p, samples)
            p.is_hr_pass = False  # l.1463
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]  # l.1019 [1024]

        def infotext(index=0, use_main_prompt=False):  # l.1026-1027 [1031-1032]: the batch's prompts
            return create_infotext(p, p.prompts, p.seeds, None, use_main_prompt=use_main_prompt, index=index)

        for i in range(len(p.prompts)):
            images.append(samples[i])
            infotexts.append(infotext(i))
    processed = Processed(p, images, infotexts)
    p.scripts.postprocess(p, processed)  # l.1148 [1156]
    return processed
