"""biqa's ``botnet50`` against the VIPNet authors' ``botnet50-vipnet``: parameters, and the
time of a forward pass (inference) and of a training step, at 384x288 -- for the whole
network and for its attention stage alone (``layer4``, where the two differ; less noisy on a
shared machine) -- as a ratio to ``botnet50`` measured in the same run (interleaved, minimum
of the repeats).

    python benchmarks/bench_dpm_archs.py                    # CPU, batch 8
    python benchmarks/bench_dpm_archs.py --device cuda --batch 64 --amp
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from biqa.training.models import create_model

ARCHS = ("botnet50", "botnet50-vipnet")


def timer(model, x, labels, train: bool, amp: bool):
    """A callable that runs one forward (no grad) or one forward+backward and returns its
    wall time in seconds.  ``labels=None``: the loss is the output's mean square."""
    device = x.device.type
    dtype = torch.bfloat16 if device == "cuda" else torch.float16

    def run() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=amp):
            if train:
                model.train()
                out = model(x).float()
                loss = out.square().mean() if labels is None else F.cross_entropy(out, labels)
                model.zero_grad(set_to_none=True)
                loss.backward()
            else:
                model.eval()
                with torch.no_grad():
                    model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CUDA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 288, 384, device=args.device)
    labels = torch.randint(0, 150, (args.batch,), device=args.device)
    models = {a: create_model(a, 150).to(args.device) for a in ARCHS}
    stage4 = torch.randn(args.batch, 1024, 18, 24, device=args.device)  # layer4's input
    for mode in ("forward", "train_step", "layer4_forward", "layer4_train_step"):
        train = mode.endswith("train_step")
        if mode.startswith("layer4"):
            runs = {a: timer(m.layer4, stage4, None, train, args.amp) for a, m in models.items()}
        else:
            runs = {a: timer(m, x, labels, train, args.amp) for a, m in models.items()}
        for run in runs.values():
            run()  # warm-up
        best = {a: float("inf") for a in ARCHS}
        repeats = args.repeats * (4 if mode.startswith("layer4") else 1)  # it is cheap
        for _ in range(repeats):  # interleaved, so load changes hit both alike
            for arch, run in runs.items():
                best[arch] = min(best[arch], run())
        for arch in ARCHS:
            print(json.dumps({"what": mode, "arch": arch, "device": args.device,
                              "batch": args.batch, "seconds_min": round(best[arch], 3),
                              "ratio_to_botnet50": round(best[arch] / best["botnet50"], 3)}))
    for arch, model in models.items():
        print(json.dumps({"arch": arch, "parameters": sum(p.numel() for p in model.parameters()),
                          "attention_parameters": sum(
                              p.numel() for n, p in model.named_parameters()
                              if n.startswith("layer4.") and ".conv2." in n)}))


if __name__ == "__main__":
    main()
