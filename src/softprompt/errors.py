"""One exception type for everything a user can get wrong: the CLI prints its message on one line."""


class SoftPromptError(Exception):
    """Bad input (file, field, model, artifact). The message names what is wrong and where."""
