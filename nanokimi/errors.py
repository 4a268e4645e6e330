"""UserError, a problem with the user's input that the CLI prints as one line, and what raises it in one way
everywhere: the command line's parser, a failed write in a few words, and the checks of what a user or a tool may
have edited (a JSON file's fields and their types, a text with half a UTF-16 surrogate pair)."""

import argparse


class UserError(Exception):
    """A problem with the user's input (data, config, checkpoint, prompt). The CLI prints it as one line, no
    traceback, and exits non-zero; its message names the problem and the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one line naming the problem and where help is), not usage + error."""

    def error(self, message):
        raise UserError(f"{message}: see `{self.prog} --help`")


def write_failure(error):
    """What went wrong in a failed write (OSError or safetensors' error), in a few words for a one-line message:
    "No space left on device", "Read-only file system", ..."""
    return getattr(error, "strerror", None) or str(error).splitlines()[0]


JSON_TYPES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "an object",
    list: "a list",
    type(None): "null",
}


def check_fields(value, path, fields, fix="restore it or write it again"):
    """`value`, the parsed JSON of file `path`, if it is an object whose fields have the JSON types of `fields`
    ({name: type or tuple of types; a name ending in "?" may be absent; float admits integers, int no booleans}),
    else a UserError naming the file and the field: the one check for every file nanoKimi reads, which a user or a
    tool may have edited."""
    if not isinstance(value, dict):
        raise UserError(f"{path} holds {JSON_TYPES.get(type(value), type(value).__name__)}, not a JSON object: {fix}")
    for name, types in fields.items():
        optional, name = name.endswith("?"), name.rstrip("?")
        types = types if isinstance(types, tuple) else (types,)
        if name not in value:
            if optional:
                continue
            raise UserError(f'{path} has no "{name}" field: {fix}')
        field = value[name]
        admitted = types + ((int,) if float in types else ())
        if isinstance(field, bool) or not isinstance(field, admitted):
            raise UserError(
                f'{path}: "{name}" is {field!r}, expected {" or ".join(JSON_TYPES[t] for t in types)}: {fix}'
            )
    return value


def check_text(text, where, name):
    """`text`, unless it holds a lone UTF-16 surrogate ("\\ud800" in JSON: no character, no UTF-8 byte, and a
    tokenizer would fail on it): then a UserError naming `where` and the field `name`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{where}: {name!r} holds {e.object[e.start : e.end]!r}, half of a UTF-16 surrogate pair and no "
            f"character: fix or drop that record"
        ) from None
    return text
