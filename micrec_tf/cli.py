"""What every command-line entry point shares: the common flags, one-line errors, quiet logs.

Each ``python -m ...`` entry point builds its parser with :func:`parser`, and ends with
``sys.exit(run(main))``::

    def main(argv=None) -> int:
        args = cli.parser(__doc__).parse_args(argv)
        cfg = cli.load(args)          # --config + --set, ConfigError on a bad key or value
        ...

    if __name__ == "__main__":
        sys.exit(cli.run(main))

A user error (:class:`UsageError`, a :class:`~micrec_tf.config.ConfigError`, a missing input
file) prints one line, ``error: <message>``, on stderr and exits 2, also when a Beam job raised
it in a worker (:func:`user_error_message`). ``--debug`` (or
``MICREC_DEBUG=1``) shows the traceback instead. TensorFlow's and Beam's own log lines are off
by default; ``--verbose`` (or ``MICREC_VERBOSE=1``) brings them back. The C++ log level of
TensorFlow is fixed when TensorFlow loads, so ``micrec_tf/__init__.py`` reads the same switch
(:func:`verbose_requested`) before anything imports TensorFlow.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings

DEBUG_ENV = "MICREC_DEBUG"
VERBOSE_ENV = "MICREC_VERBOSE"
EXIT_USAGE = 2


class UsageError(ValueError):
    """The user asked for something that cannot be done as asked; the message says what to fix."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def verbose_requested(argv=None) -> bool:
    """``--verbose`` on the command line or ``MICREC_VERBOSE=1`` in the environment."""
    argv = sys.argv[1:] if argv is None else argv
    return _env_flag(VERBOSE_ENV) or "--verbose" in argv


def debug_requested(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return _env_flag(DEBUG_ENV) or "--debug" in argv


def parser(doc: str | None, config_default: str | None = None,
           **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with ``--config``, ``--set``, ``--debug`` and ``--verbose``.

    ``doc`` is the module docstring; its first paragraph becomes the description.
    ``--config`` is required unless ``config_default`` is given. The parser exits 2 with one
    line on a bad flag, as argparse does.
    """
    description = (doc or "").strip().split("\n\n")[0].strip() or None
    p = argparse.ArgumentParser(description=description, **kwargs)
    p.add_argument("--config", required=config_default is None, default=config_default,
                   help="YAML config, e.g. configs/ml-1m.yaml"
                   + (f" (default {config_default})" if config_default else ""))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set train.epochs=3)")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    p.add_argument("--verbose", action="store_true",
                   help=f"show TensorFlow's and Beam's own log lines (or set {VERBOSE_ENV}=1)")
    return p


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1 (one-line error naming the value)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text!r}")
    return n


def non_negative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0, e.g. a seed (one-line error naming the value)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0. Received: {text!r}")
    return n


def one_of(*choices: str):
    """``argparse`` type accepting exactly one of ``choices`` (one-line error naming the value;
    unlike ``choices=``, the message says what was received)."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"takes {' or '.join(choices)}. "
                                             f"Received: {text!r}")
        return text
    return parse


def positive_seconds(text: str) -> float:
    """``argparse`` type: a finite number of seconds > 0 (one-line error naming the value)."""
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0. Received: {text!r}")
    return x


def print_json(result, out: str | None = None) -> None:
    """Prints ``result`` as indented JSON on stdout and, with ``out``, writes it there too."""
    import json

    text = json.dumps(result, indent=1)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    print(text)


def load(args):
    """The validated :class:`~micrec_tf.config.Config` of parsed ``--config`` / ``--set`` args."""
    from micrec_tf.config import load_config, parse_overrides

    quiet_logs(getattr(args, "verbose", False))
    return load_config(args.config, parse_overrides(args.set))


def quiet_logs(verbose: bool = False) -> None:
    """Silences TensorFlow's, absl's and Beam's Python loggers unless ``verbose``.

    Only what the project prints itself (``[train] ...`` progress lines), errors, and warnings
    the project raises on purpose remain.
    """
    if verbose or verbose_requested():
        return
    for name in ("tensorflow", "absl", "apache_beam", "h5py", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # absl logging (TensorFlow's Python logger sits on it)
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with TensorFlow
        pass
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].get_logger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _user_errors() -> tuple:
    from micrec_tf.config import ConfigError

    return (UsageError, ConfigError, FileNotFoundError, NotADirectoryError)


# Beam appends the step to an exception it re-raises in-process; a runner with worker processes
# raises a RuntimeError holding the worker's traceback, whose last line is ``<Class>: <message>``.
_BEAM_STEP = re.compile(r"\s*\[while running '[^']*'\]\s*$")
_USER_ERROR_NAMES = ("UsageError", "InputError", "ConfigError", "ArtifactError",
                     "ArtifactContentError")
_WORKER_USER_ERROR = re.compile(
    rf"^(?:[\w.]+\.)?(?:{'|'.join(_USER_ERROR_NAMES)}): (.+)$", re.MULTILINE)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of a user error, or None when ``err`` is not one (a bug).

    A user error raised inside a Beam job reaches the driver either as itself with
    `` [while running '<step>']`` appended (in-process runners: the suffix is dropped) or as a
    ``RuntimeError`` holding the worker's traceback text (multi-process runners: its
    ``<UserErrorClass>: <message>`` line is the message).
    """
    if isinstance(err, _user_errors()):
        text = str(err)
    else:
        found = _WORKER_USER_ERROR.findall(str(err)) if isinstance(err, RuntimeError) else []
        if not found:
            return None
        text = found[-1]
    return _BEAM_STEP.sub("", " ".join(text.split()))


def run(main, argv=None) -> int:
    """Calls ``main(argv)``; a user error becomes one ``error: ...`` line on stderr and exit 2.

    Any other exception keeps its traceback (it is a bug, and the traceback is what a bug report
    needs). ``--debug`` / ``MICREC_DEBUG=1`` re-raise user errors too.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except (*_user_errors(), RuntimeError) as err:
        one_line = user_error_message(err)
        if one_line is None or debug_requested(argv):
            raise
        print(f"error: {one_line} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

