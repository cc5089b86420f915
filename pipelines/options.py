"""Beam pipeline options of the two jobs (preprocess, title neighbours): standard
``PipelineOptions`` from the command line and ``preprocess.beam_args``, strictly checked, with the
runners this project's transforms are known to run correctly on.

Runners (``--runner``):

- ``DirectRunner`` (default): one machine; keeps every PCollection in memory.
- ``DataflowRunner``, ``FlinkRunner``, ``SparkRunner``, ``PortableRunner``, ``PrismRunner``: Beam's
  own runners and job servers (see README "Running Beam on a cluster").
- Refused (:data:`REFUSED_RUNNERS`): runners known to give wrong results for these transforms,
  with the reason. ``DaskRunner`` (``apache-beam[dask]``) routes every element of a multi-output
  ``ParDo`` (the dead-letter pattern: :mod:`pipelines.rows`) to a tagged output, twice, with no
  error.
- Any other runner is allowed with a warning that it is untested here.
"""
from __future__ import annotations

import difflib
import logging

from pipelines.common import quiet_root_logger

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions  # noqa: E402

from micrec_tf import cli  # noqa: E402
from micrec_tf.config import Config  # noqa: E402

LOG = logging.getLogger("pipelines.options")

__all__ = ["beam_options", "pipeline_options", "check_runner", "SUPPORTED_RUNNERS",
           "REFUSED_RUNNERS"]

SUPPORTED_RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner",
                     "PortableRunner", "PrismRunner")
REFUSED_RUNNERS = {
    "DaskRunner": "it sends every element of a multi-output ParDo (the dead-letter pattern of "
                  "pipelines/rows.py) to the tagged output, twice, without an error, so the "
                  "artifacts would be wrong",
}


def check_runner(runner) -> str:
    """The runner's class name; :class:`cli.UsageError` for a refused runner (with why), a warning
    for one outside :data:`SUPPORTED_RUNNERS`. ``runner`` is a name, a dotted path or a class."""
    if isinstance(runner, str):
        name = runner.rsplit(".", 1)[-1]
    else:
        name = (runner if isinstance(runner, type) else type(runner)).__name__
    if name in REFUSED_RUNNERS:
        raise cli.UsageError(f"--runner={name} is not supported: {REFUSED_RUNNERS[name]}. "
                             f"Use one of {', '.join(SUPPORTED_RUNNERS)}")
    if name not in SUPPORTED_RUNNERS:
        LOG.warning("runner %s is not tested with these jobs (supported: %s)", name,
                    ", ".join(SUPPORTED_RUNNERS))
    return name


def _beam_parser():
    """The argparse parser of every registered Beam ``PipelineOptions`` class.

    Beam hands it to ``add_extra_args_fn``; its ``error`` raises :class:`cli.UsageError` instead
    of printing Beam's whole usage and exiting.
    """
    captured = []
    with quiet_root_logger():  # PipelineOptions() calls logging.basicConfig()
        PipelineOptions([]).get_all_options(add_extra_args_fn=captured.append)
    parser = captured[0]

    def error(message):
        raise cli.UsageError(f"bad Beam pipeline option: {message}")

    parser.error = error
    return parser


def _option_strings(parser) -> list:
    return [o for action in parser._actions for o in action.option_strings]


def beam_options(beam_argv, command=None) -> PipelineOptions:
    """``PipelineOptions`` of ``beam_argv``, DirectRunner unless a runner is given.

    An argument that no Beam options class recognises is a :class:`cli.UsageError` naming it,
    with the closest flag of ``command`` (the calling command's argparse parser) or of Beam,
    instead of Beam's ``Unparseable argument`` warning and a run that ignores it.
    """
    beam_argv = [str(a) for a in beam_argv]
    parser = _beam_parser()
    _, unknown = parser.parse_known_args(beam_argv)
    if unknown:
        flags = (_option_strings(command) if command else []) + _option_strings(parser)
        first = next((a.split("=", 1)[0] for a in unknown if a.startswith("-")), None)
        close = difflib.get_close_matches(first, flags, n=1) if first else []
        hint = f"; did you mean {close[0]}?" if close else ""
        raise cli.UsageError(
            f"unrecognized arguments {unknown}: neither a flag of this command nor a Beam "
            f"pipeline option (command line or preprocess.beam_args){hint}")
    with quiet_root_logger():
        options = PipelineOptions(beam_argv)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "DirectRunner"
    check_runner(standard.runner)
    return options


def pipeline_options(cfg: Config, beam_argv=(), command=None) -> PipelineOptions:
    """:func:`beam_options` of ``preprocess.beam_args`` followed by ``beam_argv``."""
    return beam_options(list(cfg.preprocess.beam_args) + list(beam_argv), command)
