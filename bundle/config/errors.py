"""The bundle's one exception type, and where it becomes an exit status.

Components never end the process: a problem the user can fix (a bad setting, an unreadable file, a model that
does not fit the data) raises :class:`BundleError` with a short report, a title and one line per problem, naming the
file or setting. Called in-process (a notebook, a MONAI Label server, a test) the caller catches it like any
``ValueError``. Only the command-line entry points turn it into exit status 1 with the report as the last output:

* ``python -m monai.bundle run ...``: the first ``initialize`` step of each config is
  :func:`exit_on_bundle_error`, which installs :func:`report_and_exit` as ``sys.excepthook``. MONAI wraps every
  exception raised while a config component is built or evaluated in a ``RuntimeError``; the hook finds the
  :class:`BundleError` in the cause chain and prints its report instead of the traceback (the interpreter exits with
  status 1 after an uncaught exception). Exceptions of other types keep Python's traceback.
* ``scripts/*.py``: their ``main`` runs under :func:`cli`, which converts a :class:`BundleError` into
  ``SystemExit(report)``.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence


class BundleError(ValueError):
    """A problem the user can fix, reported as ``title`` followed by one indented line per problem.

    Args:
        title: what could not be done (``"Cannot segment:"``); when ``lines`` is empty, the whole message.
        lines: one line per file or setting and its problem.
    """

    def __init__(self, title: str, lines: Sequence[str] = ()) -> None:
        self.title = title
        self.lines = list(lines)
        super().__init__("\n".join([title] + [f"  {line}" for line in self.lines]))


def find_bundle_error(err: Optional[BaseException]) -> Optional[BundleError]:
    """The first :class:`BundleError` in ``err``'s chain of causes and contexts (``err`` itself included), or
    ``None``: MONAI's config resolution re-raises a component's error as the cause of a ``RuntimeError``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BundleError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def report_and_exit(kind: type, value: BaseException, traceback) -> None:
    """``sys.excepthook``: the report of a :class:`BundleError` in the chain on stderr, else Python's traceback."""
    error = find_bundle_error(value)
    if error is None:
        sys.__excepthook__(kind, value, traceback)
        return
    sys.stdout.flush()
    print(str(error), file=sys.stderr, flush=True)


def exit_on_bundle_error() -> None:
    """The first ``initialize`` step of the configs: from here on, an uncaught :class:`BundleError` ends a
    ``monai.bundle run`` with its report and exit status 1 instead of a traceback. In-process callers are not
    affected: they receive the exception (a hook only sees exceptions that nothing caught)."""
    sys.excepthook = report_and_exit


@contextmanager
def cli() -> Iterator[None]:
    """For a script's ``main``: a :class:`BundleError` (also as the cause of another error) becomes
    ``SystemExit(report)``, i.e. the report as the last output and exit status 1."""
    try:
        yield
    except Exception as err:
        error = find_bundle_error(err)
        if error is None:
            raise
        sys.stdout.flush()
        raise SystemExit(str(error)) from None
