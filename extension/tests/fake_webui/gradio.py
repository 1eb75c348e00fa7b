"""Stand-in for ``gradio``: components record their keyword arguments.

Written for these tests (no gradio code). Only what the extension and the fake
settings page (``modules/ui_settings.py``) create."""


class Component:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value")


class Textbox(Component):
    pass


class Number(Component):
    pass


class Checkbox(Component):
    pass


class Dropdown(Component):
    pass


class Slider(Component):
    def __init__(self, minimum=0, maximum=100, step=None, **kwargs):
        super().__init__(minimum=minimum, maximum=maximum, step=step, **kwargs)
        if not minimum <= (kwargs.get("value") if kwargs.get("value") is not None else minimum) <= maximum:
            raise ValueError(f"slider value {kwargs.get('value')} outside [{minimum}, {maximum}]")


class Accordion(Component):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
