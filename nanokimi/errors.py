class UserError(Exception):
    """A problem with the user's input (data, config, checkpoint, prompt). The CLI prints it as one line, no
    traceback, and exits non-zero; its message names the problem and the fix."""


def write_failure(error):
    """What went wrong in a failed write (OSError or safetensors' error), in a few words for a one-line message:
    "No space left on device", "Read-only file system", ..."""
    return getattr(error, "strerror", None) or str(error).splitlines()[0]
