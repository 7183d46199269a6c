"""The one error type for bad input a user can fix (a missing file, malformed JSON, an unreadable image).

Scripts catch it at the top and print one line, `error: ...`, instead of a traceback.
"""


class DataError(ValueError):
    """Bad user data: the message names the file / entry and what is wrong with it."""
