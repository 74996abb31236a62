"""rigl_keras: sparse training from scratch with RigL and its baselines, on Keras 3."""

from setuptools import find_packages, setup

EXAMPLES = ["absl-py", "tensorflow-datasets", "importlib_resources", "matplotlib", "tensorboard"]

setup(
    name="rigl_keras",
    version="0.2.0",
    description="RigL (Rigging the Lottery) and sparse-training baselines for Keras 3 model.fit",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rigl_keras", "rigl_keras.*"]),
    python_requires=">=3.9",
    # The backend is the user's choice: install one of the extras below (the
    # examples read data with tensorflow-datasets and so need TensorFlow).
    install_requires=["keras>=3.8", "numpy"],
    extras_require={
        "tensorflow": ["tensorflow>=2.16"],
        "jax": ["jax"],
        # A plain `torch` requirement may pull a multi-GB CUDA build; install
        # the build you want first (e.g. `pip install torch==2.13.0` for CPU).
        "torch": ["torch"],
        "examples": EXAMPLES + ["tensorflow>=2.16"],
        "test": EXAMPLES + ["tensorflow>=2.16", "pytest", "hypothesis", "keras-hub"],
        # Importing tfmot switches tf.keras to Keras 2 for the whole process:
        # rigl_keras never imports it; tests use it in a subprocess only.
        "tfmot": ["tensorflow-model-optimization", "tf_keras"],
    },
    entry_points={"console_scripts": ["rigl-flops=rigl_keras.flops:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
