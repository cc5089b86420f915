"""micrec_tf: MicRec, multi-granularity item-based contrastive recommendation, in TF2 / Keras 2.

TensorFlow Recommenders needs Keras 2, so ``TF_USE_LEGACY_KERAS`` is set here, before anything
imports TensorFlow. Import ``micrec_tf`` (or any submodule) before ``tensorflow``.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
