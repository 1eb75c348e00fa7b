"""``OptionInfo`` and ``Options.add_option`` with the real signatures.

Contracts (written from reading the real code, not copied):
* ``OptionInfo.__init__(default=None, label="", component=None, component_args=None,
  onchange=None, section=None, refresh=None, comment_before='', comment_after='',
  infotext=None, restrict_api=False, category_id=None)``: A1111 v1.10.1
  ``modules/options.py:13-14``, Forge dfdcbab6 ``modules/options.py:13-14``. Any
  other keyword is a TypeError there, so it is one here.
* ``Options.add_option(key, info)`` stores the info in ``data_labels`` and, unless
  the key is already set, the default in ``data``: A1111 ``modules/options.py:256-259``,
  Forge ``modules/options.py:256-259``.
"""


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label = default, label
        self.component, self.component_args = component, component_args
        self.onchange, self.section, self.refresh = onchange, section, refresh
        self.comment_before, self.comment_after = comment_before, comment_after
        self.infotext, self.restrict_api, self.category_id = infotext, restrict_api, category_id
        self.do_not_save = False


class Options:
    def __init__(self):
        self.__dict__["data_labels"] = {}
        self.__dict__["data"] = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value
