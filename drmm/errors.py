"""The one exception for input a user can fix: a bad config key or value, a missing or corrupt data file, a
checkpoint that is not a drmm checkpoint, a folder that is not a run.

It is raised where the problem is found, with a message that says what is wrong and how to fix it, in one line.
``drmm.cli.main`` catches it and prints ``drmm <command>: error: <message>`` on stderr, exit status 2, no traceback
(``drmm --debug ...`` re-raises it). It derives from ValueError so library callers that catch ValueError keep
working; the file-flavoured subclasses also derive from the matching OSError.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UsageError(ValueError):
    """Bad input the user can fix; the message is one line saying what is wrong and how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["UsageError", "did_you_mean"]
