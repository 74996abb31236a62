"""rigl_keras: sparse training from scratch with RigL and its baselines, on Keras 3."""

from setuptools import find_packages, setup

EXAMPLES = ["absl-py", "tensorflow-datasets", "importlib_resources", "matplotlib"]

setup(
    name="rigl_keras",
    version="0.1.0",
    description="RigL (Rigging the Lottery) and sparse-training baselines for Keras 3 model.fit",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rigl_keras", "rigl_keras.*"]),
    python_requires=">=3.9",
    install_requires=["tensorflow>=2.16", "keras>=3.0", "numpy"],
    extras_require={
        "examples": EXAMPLES,
        "test": EXAMPLES + ["pytest", "hypothesis"],
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
