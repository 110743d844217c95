"""Errors that reach a person: one sentence naming the bad value, never a traceback."""


class UserInputError(ValueError):
    """Bad input from a user (a file, an image, a preset name, an option).

    The CLI prints the message as one line and exits with code 2; the app shows it in the page.
    """
