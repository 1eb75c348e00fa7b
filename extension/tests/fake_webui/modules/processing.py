class StableDiffusionProcessing:
    """Just the fields the extension reads or writes."""

    def __init__(self, prompts, batch_size, sd_model, hr_prompts=None):
        self.all_prompts = list(prompts)
        self.all_hr_prompts = list(hr_prompts) if hr_prompts else []
        self.prompt = self.all_prompts[0]
        self.batch_size = batch_size
        self.n_iter = (len(prompts) + batch_size - 1) // batch_size
        self.iteration = 0
        self.sd_model = sd_model
        self.extra_generation_params = {}
        self.is_hr_pass = False
        self.prompts = []

    def start_batch(self, n):
        self.iteration = n
        self.prompts = self.all_prompts[n * self.batch_size:(n + 1) * self.batch_size]
        return self.prompts
