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
