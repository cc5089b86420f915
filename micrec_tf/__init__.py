"""micrec_tf: MicRec, multi-granularity item-based contrastive recommendation, in TF2 / Keras 2.

TensorFlow Recommenders needs Keras 2, so ``TF_USE_LEGACY_KERAS`` is set here, before anything
imports TensorFlow. Import ``micrec_tf`` (or any submodule) before ``tensorflow``.

TensorFlow's C++ log level is read once, when TensorFlow loads, so it is chosen here too: off
(errors surface as Python exceptions) unless ``--verbose`` or ``MICREC_VERBOSE=1`` (see
:mod:`micrec_tf.cli`); an explicit ``TF_CPP_MIN_LOG_LEVEL`` wins.
"""
import os

from micrec_tf.cli import verbose_requested

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose_requested() else "3")

__version__ = "0.1.0"
