class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, section=None, **kw):
        self.default, self.label, self.section = default, label, section
        self.component, self.component_args = component, component_args


class Options:
    def __init__(self):
        self.__dict__["data_labels"] = {}
        self.__dict__["data"] = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


class CmdOpts:
    lora_dir = None


opts = Options()
cmd_opts = CmdOpts()
sd_model = None
