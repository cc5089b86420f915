"""micrec_tf: MicRec (multi-granularity item-based contrastive recommendation) in TensorFlow 2."""
from setuptools import find_packages, setup

setup(
    name="micrec_tf",
    version="0.1.0",
    description="MicRec two-tower matching with item-based contrastive learning (TF2 / Keras 2)",
    # ``pipelines`` and ``export`` are top-level by the product's design (their CLIs are
    # ``python -m pipelines.preprocess`` and ``python -m export.export_model``, and
    # ``micrec_tf.retrieval`` reads ``export.requests``), so they are installed under those names:
    # install into a virtual environment (``make install`` does), where no other distribution
    # ships an ``export`` or ``pipelines`` package. ``experiments`` and ``benchmarks`` are not
    # installed: they run from a checkout (``make reproduce`` / ``make bench``).
    packages=find_packages(include=["micrec_tf", "micrec_tf.*", "pipelines", "pipelines.*",
                                    "export", "export.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        "tensorflow==2.20.*",
        "tf-keras==2.20.*",
        "tensorflow-text==2.20.*",
        "scann[tf]==1.4.2",
        "tensorflow-recommenders==0.7.7",
        # TF Serving's PredictRequest / PredictResponse / PredictionLog protos (export/serving.py).
        # Pinned to TensorFlow's release: 2.21.0 requires tensorflow>=2.21 (and protobuf>=6.31.1),
        # while 2.20.* requires tensorflow>=2.20,<3 and adds only itself to the pinned stack.
        "tensorflow-serving-api==2.20.*",
        "apache-beam[tfrecord]>=2.60",
        # The online retrieval service (export/server.py, docs/SERVING.md): ASGI server, thin
        # framework, Prometheus text format.
        "uvicorn>=0.30,<1",
        "starlette>=0.40,<2",
        "prometheus-client>=0.20,<1",
        "numpy",
        "pyyaml",
        "safetensors",
        "scipy",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "hypothesis", "nbclient", "nbformat", "ipykernel"],
        "gpu": ["tensorflow[and-cuda]==2.20.*"],
    },
)
