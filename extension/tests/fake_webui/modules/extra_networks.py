"""Extra-network tag parsing and activation (our own code, same behaviour).

Contracts, A1111 v1.10.1 ``modules/extra_networks.py`` (Forge: same):
* tags match ``<(\\w+):([^>]+)>`` (l.175) and are removed from the prompt; each
  becomes ``ExtraNetworkParams(items=args.split(":"))`` under its kind (l.178-191);
  ``positional`` holds the items without ``=`` (l.31-42);
* ``parse_prompts(prompts)`` returns the cleaned prompts and the extra-network data
  of the **first** prompt only (l.194-207);
* ``activate(p, extra_network_data)`` calls each registered network with its list
  (l.126-...). Here a registered network is anything with ``activate(p, params_list)``.
"""

import re
from collections import defaultdict

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
registry = {}
aliases = {"lyco": "lora"}  # the built-in Lora registers "lyco" as an alias of "lora"


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = [x for x in self.items if not (isinstance(x, str) and len(x.split("=", 2)) == 2)]
        self.named = dict(x.split("=", 1) for x in self.items if isinstance(x, str) and len(x.split("=", 2)) == 2)


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re_extra_net.sub(found, prompt), res


def parse_prompts(prompts):
    out, data = [], None
    for prompt in prompts:
        cleaned, parsed = parse_prompt(prompt)
        if data is None:
            data = parsed
        out.append(cleaned)
    return out, data


def activate(p, extra_network_data):
    data = extra_network_data or {}
    for kind, net in registry.items():
        params = list(data.get(kind, []))
        for alias, target in aliases.items():
            if target == kind:
                params += list(data.get(alias, []))
        net.activate(p, params)
