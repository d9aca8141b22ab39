"""Where a training step's time goes: ``torch.profiler`` over a few steps of one model.

    python benchmarks/profile_step.py [--device cuda] [--task resnet32] [--method ours] [--compile] [--steps 10]

Prints the top operators by device time (CUDA) or CPU time, with their call counts, and the
step's total CPU and device time: many small kernels and Python per layer show up as a long
table of cheap calls and CPU time well above device time. The README's GPU section quotes it
for every target ``benchmarks/models.py`` misses. Compiled on CUDA it also counts the CUDA graph
recordings during the profiled steps: after the warm-up there should be none (a graph re-recorded
on every step, as when a static input moves, costs more than eager).
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.profiler import ProfilerActivity, profile

from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config, resolve_device
from rankbench.run.prepare import build_model
from rankbench.run.trainer import batch_trainer, compile_module, compile_options


class MessageCount(logging.Handler):
    """Counts log messages containing ``text`` (torch's loggers, with ``set_logs`` on)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.count = text, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += self.text in record.getMessage()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--task", default="resnet32")
    parser.add_argument("--method", default="ours")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-backend", default=None)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    device = resolve_device(args.device)
    registry = Registry.discover()
    params = {"rank": make_config(registry, args.task, "dense", {}).task_params["initial_rank"]} \
        if args.method == "trn" else {}
    config = make_config(registry, args.task, args.method, params)
    task = registry.task(args.task)(config.task_params)
    method = registry.method(args.method)(config.method_params)
    model = build_model(task, method, 0, MethodContext(num_train=50000, device=device))
    x = task.example_input(args.batch).to(device)
    with torch.no_grad():
        y = model.eval()(x).argmax(-1)
    model.train()
    trainer = batch_trainer(model, method, task, x, y, device)

    def step(runner) -> None:
        trainer.runner = runner
        trainer.train_step(x, y)

    for _ in range(3):
        step(model)  # eager warm-up: contraction plans
    runner = model
    if args.compile:
        runner = compile_module(model, **compile_options(device, args.compile_backend))
        for _ in range(3):
            step(runner)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    recordings = MessageCount("ecording function")  # "Recording function=..." and "Re-recording function=..."
    cudagraph_log = torch._logging.getArtifactLogger("torch._inductor.cudagraph_trees", "cudagraphs")
    count_recordings = args.compile and device.type == "cuda"
    if count_recordings:
        torch._logging.set_logs(cudagraphs=True)
        cudagraph_log.addHandler(recordings)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(runner)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if count_recordings:
        cudagraph_log.removeHandler(recordings)
        torch._logging.set_logs()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    events = prof.key_averages()
    print(f"{args.method} on {args.task}, batch {args.batch}, {args.steps} steps, "
          f"{'compiled' if args.compile else 'eager'}, device {device}")
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if count_recordings:
        print(f"CUDA graph recordings during the {args.steps} profiled steps: {recordings.count} (0 expected)")


if __name__ == "__main__":
    main()
