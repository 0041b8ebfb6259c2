"""Why CNNs keep the default memory layout on the CPU: what channels_last would buy, and the crash.

    python benchmarks/cpu_layout.py [--model resnet_7mf] [--image-size 32] [--batch-size 128]
                                    [--steps 10] [--threads 1] [--compile]

On CUDA vitexp trains CNNs in channels_last (cuDNN's fast layout). On the CPU it does not:
oneDNN's backward of a 1x1 stride-2 conv from 8 channels in channels_last crashes the process
(SIGSEGV or SIGABRT) at 48 px and above (torch 2.14.1), and the 7 MF ResNet's shortcut is such a conv at 64 px. This
script prints the training step's time in both layouts (same model, seed and batch; the
median of STEPS after two untimed ones) and then probes the crash in a child process, so
that after a torch upgrade one run says whether the CPU may switch layouts and what it gains.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the smallest case found to crash: 1x1 stride-2 conv, 8 -> 16 channels, 64 px, batch 8
PROBE = """
import torch
conv = torch.nn.Conv2d(8, 16, 1, 2, bias=False).to(memory_format=torch.channels_last)
x = torch.randn(8, 8, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
conv(x).sum().backward()
"""


def step_seconds(model: str, image_size: int, batch: int, steps: int, channels_last: bool, compile: bool) -> float:
    """Median seconds of one SGD training step on a random batch."""
    import torch

    from vitexp.models import build_model
    from vitexp.runtime import compile_model

    torch.manual_seed(0)
    net = build_model(model, image_size=image_size, in_chans=1, num_classes=10)
    x, y = torch.randn(batch, 1, image_size, image_size), torch.randint(0, 10, (batch,))
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    step_net = compile_model(net, torch.device("cpu")) if compile else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(step_net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # the first two: a compile, oneDNN's first-call setup
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe() -> str:
    """Whether the crashing conv's backward runs, in a child process (a segfault ends only it)."""
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    if p.returncode == 0:
        return "runs"
    return f"crashes ({signal.Signals(-p.returncode).name if p.returncode < 0 else f'exit {p.returncode}'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet_7mf")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.threads} thread(s), "
          f"{'compiled' if args.compile else 'eager'}, torch {torch.__version__}")
    secs = {}
    for name, cl in (("default", False), ("channels_last", True)):
        secs[name] = step_seconds(args.model, args.image_size, args.batch_size, args.steps, cl, args.compile)
        print(f"  {name:<14} {secs[name] * 1e3:8.1f} ms a step  {args.batch_size / secs[name]:8.0f} img/s")
    print(f"  channels_last / default speed: {secs['default'] / secs['channels_last']:.2f}x")
    print(f"oneDNN 1x1 stride-2 conv backward, 8 channels, 64 px, channels_last: {probe()}")


if __name__ == "__main__":
    main()
