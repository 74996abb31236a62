"""What an exact mask costs a PyTorch matmul, forward and backward, on CPU.

Times `x @ W` and its backward (batch 100, W 784×300 at 90% sparsity), each
call after an in-place write to W (as an optimizer step makes), with W
unmasked; masked by rigl_keras on Keras variables (`backend.masked_value`,
eager: W zeroed outside the mask in place, `.grad` masked in place by an
accumulate hook); masked by its autograd function (a bitwise AND forward and
backward: the path for plain tensors, torch.compile and stateless calls);
multiplied by the mask (which lets a NaN stored outside the mask through);
and the select alone (the AND, the multiply). Interleaved in rounds; the
fastest round of each is printed (the machine is shared: slower rounds are
other work).

Whole Keras training steps, both paths: `mask_cost.py --backend torch`.

    python benchmarks/torch_mask_cost.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import torch  # noqa: E402

from rigl_keras import backend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    args = parser.parse_args()

    torch.manual_seed(0)
    w = torch.randn(784, 300, requires_grad=True)
    mask = (torch.rand(784, 300) > 0.9).float()
    bits = (mask != 0).to(torch.int32).neg()
    x = torch.randn(100, 784)
    variable = keras.Variable(w.detach() * mask)
    mask_variable = keras.Variable(mask, trainable=False)

    def step(weight, effective):
        def run():
            with torch.no_grad():
                weight.mul_(1.0)  # a write, as the optimizer step makes
            (x @ effective()).sum().backward()
            weight.grad = None
        return run

    cases = {
        "x @ W, forward+backward": step(w, lambda: w),
        "x @ masked_value(W) eager": step(variable.value,
                                          lambda: backend.masked_value(variable, mask_variable)),
        "x @ autograd function": step(w, lambda: backend.masked_value(w, mask)),
        "x @ (W * mask)": step(w, lambda: w * mask),
        "AND alone": lambda: (w.detach().view(torch.int32) & bits).view(torch.float32),
        "multiply alone": lambda: w.detach() * mask,
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                run()
            best[name] = min(best[name], (time.perf_counter() - start) / args.calls)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastest of {args.rounds} rounds")
    for name, seconds in best.items():
        print(f"{name:<26} {1e6 * seconds:8.1f} µs")


if __name__ == "__main__":
    main()
