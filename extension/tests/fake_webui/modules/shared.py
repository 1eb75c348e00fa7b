"""``modules.shared``: ``opts``, ``OptionInfo`` (A1111 v1.10.1 ``modules/shared.py:77``
re-exports ``options.OptionInfo``), ``cmd_opts``."""

from modules.options import OptionInfo, Options  # noqa: F401


class CmdOpts:
    lora_dir = None


opts = Options()
cmd_opts = CmdOpts()
sd_model = None
