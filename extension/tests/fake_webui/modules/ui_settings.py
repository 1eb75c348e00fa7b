"""The settings page's drawing rule for one option (our own code, same rule).

Contract: A1111 v1.10.1 ``modules/ui_settings.py:22-49`` (Forge dfdcbab6
``modules/ui_settings.py:23-50``, the same rule): the component is
``info.component`` when given; otherwise it is chosen from ``type(info.default)``:
``str`` → Textbox, ``int`` → Number, ``bool`` → Checkbox, and any other type
raises ``Exception('bad options item type: <type> for key <key>')``. Then
``comp(label=info.label, value=<current or default>, elem_id="setting_<key>",
**component_args)``, where ``component_args`` may be a callable returning the dict.
The WebUI draws every option in ``opts.data_labels`` this way when it builds the
settings UI, so one bad option stops the WebUI from starting.
"""

import gradio as gr

from modules.shared import opts


def create_setting_component(key, is_quicksettings=False):
    info = opts.data_labels[key]
    t = type(info.default)
    args = info.component_args() if callable(info.component_args) else info.component_args
    if info.component is not None:
        comp = info.component
    elif t == str:
        comp = gr.Textbox
    elif t == int:
        comp = gr.Number
    elif t == bool:
        comp = gr.Checkbox
    else:
        raise Exception(f'bad options item type: {t} for key {key}')
    value = opts.data[key] if key in opts.data else info.default
    return comp(label=info.label, value=value, elem_id=f"setting_{key}", **(args or {}))


def create_ui():
    """Every option, as the settings page does."""
    return {key: create_setting_component(key) for key in opts.data_labels}
