class UserError(Exception):
    """A problem with the user's input (data, config, checkpoint, prompt). The CLI prints it as one line, no
    traceback, and exits non-zero; its message names the problem and the fix."""
