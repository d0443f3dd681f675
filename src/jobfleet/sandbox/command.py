"""Which commands need a shell: a plain word list is started directly, as make does.

`/bin/sh -c 'python train.py --lr=0.1'` costs an extra program start (dash's start-up is a
good part of a short job's cost) and does nothing the shell is needed for: there is nothing to
expand, quote, redirect or chain. Such a command is split on blanks and its program found on
PATH, which behaves exactly as the shell would. Anything else (quotes, `$`, globs, `~`,
redirections, `;`, `&&`, pipes, assignments, backslashes, comments, a shell builtin or keyword
first) goes through the shell unchanged.
"""

from __future__ import annotations

import re

#: a command of words made only of characters no POSIX shell gives a meaning to
_PLAIN = re.compile(r"[ \t]*[\w./,:+@%=-]+(?:[ \t]+[\w./,:+@%=-]+)*[ \t]*", re.ASCII)
#: first words the shell runs itself, differently from a program of that name, or parses
_KEYWORDS = "case do done elif else esac fi for function if in select then time until while"
_BUILTINS = (". : alias bg break cd command continue echo eval exec exit export fc fg getopts "
             "hash jobs kill local printf pwd read readonly return set shift source test times "
             "trap type ulimit umask unalias unset wait")
_SHELL_ONLY = frozenset(f"{_KEYWORDS} {_BUILTINS}".split())


def direct_argv(command: str) -> list[bytes] | None:
    """`command` as an argv to start without a shell, or None when it needs one."""
    if not _PLAIN.fullmatch(command):
        return None
    words = command.split()
    if "=" in words[0] or words[0] in _SHELL_ONLY:  # `A=1 cmd` sets a variable for cmd
        return None
    return [w.encode() for w in words]
