"""Runnable examples that reproduce the RigL paper's comparisons with rigl_keras.

Every script runs as a program (`python examples/fashion_mnist_mlp.py --help`)
and exposes a `run(config)` function for use in-process (reproduce.py, tests).
"""
