"""``Script``, ``AlwaysVisible`` and a runner that calls always-on scripts the way
the real ``ScriptRunner`` does (our own code).

Contracts, A1111 v1.10.1 ``modules/scripts.py`` (Forge dfdcbab6 line in brackets):
each call slices the script's UI values, ``script_args = p.script_args[args_from:args_to]``, then
* ``script.process(p, *script_args)`` l.832 [844];
* ``script.process_before_every_sampling(p, *script_args, **kwargs)`` l.840 [852, 892];
* ``script.before_process_batch(p, *script_args, **kwargs)`` l.848 [860];
* ``script.process_batch(p, *script_args, **kwargs)`` l.864 [884];
* ``script.postprocess(p, processed, *script_args)`` l.872 [900].
The kwargs are those of the caller in ``processing.py`` (see ``modules/processing.py`` here).
"""

AlwaysVisible = object()


class Script:
    filename = None
    args_from = None
    args_to = None
    infotext_fields = None
    paste_field_names = None
    sorting_priority = 0


def basedir():
    return ""


class ScriptRunner:
    def __init__(self, scripts, ui_values):
        """``ui_values``: one list per script (what its ``ui()`` components return)."""
        self.alwayson_scripts = list(scripts)
        args = []
        for s, vals in zip(self.alwayson_scripts, ui_values):
            s.args_from = len(args)
            args.extend(vals)
            s.args_to = len(args)
        self.script_args = tuple(args)

    def _args(self, p, s):
        return p.script_args[s.args_from:s.args_to]

    def process(self, p):
        for s in self.alwayson_scripts:
            s.process(p, *self._args(p, s))

    def process_before_every_sampling(self, p, **kwargs):
        for s in self.alwayson_scripts:
            s.process_before_every_sampling(p, *self._args(p, s), **kwargs)

    def before_process_batch(self, p, **kwargs):
        for s in self.alwayson_scripts:
            s.before_process_batch(p, *self._args(p, s), **kwargs)

    def process_batch(self, p, **kwargs):
        for s in self.alwayson_scripts:
            s.process_batch(p, *self._args(p, s), **kwargs)

    def postprocess(self, p, processed):
        for s in self.alwayson_scripts:
            s.postprocess(p, processed, *self._args(p, s))
