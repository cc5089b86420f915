"""The Keras global dtype policy, set for one block and restored after it.

``tf_keras.mixed_precision.set_global_policy`` changes process-wide state: every layer built
afterwards, in any caller, takes that policy. Training (``mixed_float16`` where it pays) and the
export (always ``float32``) set it through :func:`policy_scope`, so the caller's policy is back in
place when they return or raise.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tf_keras

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


@contextlib.contextmanager
def policy_scope(name: str) -> Iterator[tf_keras.mixed_precision.Policy]:
    """Sets the global dtype policy to ``name`` (one of :data:`POLICIES`) inside the block.

    Yields the policy in force; on exit (also on an exception) the policy that was global before
    the block is set again. Layers built inside the block keep the block's policy afterwards.
    """
    if name not in POLICIES:
        raise ValueError(f"policy_scope: unknown dtype policy; choose from {list(POLICIES)}. "
                         f"Received: name={name!r}")
    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(name)
    try:
        yield tf_keras.mixed_precision.global_policy()
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)


# CPU flags that make bfloat16 matrix products native (oneDNN), as /proc/cpuinfo names them.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
    """The ``flags`` of the first processor in ``path`` (an empty set where there is no such
    file, e.g. not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
