#!/usr/bin/env python3
"""Cross-check `sepconv conv` against PyTorch: outputs and all gradients on a set of geometries.

Usage:
    python bench/crosscheck_torch.py [--sepconv target/release/sepconv]

Needs numpy and torch; without them it prints a message and exits 0 (it is not part of CI).
Each case writes random float32 .npy inputs, runs `sepconv conv` with --grad-output, and
compares y, grad-input, grad-weight and grad-bias with torch.nn.functional.conv2d and autograd
(padding resolved with the TF/ONNX 'same' rule and applied with F.pad, so asymmetric and
same-lower padding are checked too). Exit code 1 if any case differs by more than 1e-4
relative (to the largest magnitude of the PyTorch result).
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as e:  # not an error: the check is optional
    print(f"skipped: {e} (pip install numpy torch to run the PyTorch cross-check)")
    sys.exit(0)

# (name, x shape, w shape, stride, dilation, padding, groups)
CASES = [
    ("standard 3x3 same", (2, 3, 9, 8), (4, 3, 3, 3), (1, 1), (1, 1), "same", 1),
    ("strided even kernel same", (1, 2, 10, 9), (3, 2, 4, 2), (2, 3), (1, 1), "same", 1),
    ("same-lower stride 2", (2, 4, 7, 7), (4, 4, 3, 3), (2, 2), (1, 1), "same-lower", 1),
    ("dilated asymmetric", (1, 3, 12, 11), (2, 3, 3, 3), (1, 2), (2, 1), "2,0,1,3", 1),
    ("grouped", (2, 6, 8, 8), (9, 2, 3, 3), (1, 1), (1, 1), "1,1,1,1", 3),
    ("depthwise x2 strided", (2, 4, 11, 10), (8, 1, 3, 3), (2, 2), (1, 1), "same", 4),
    ("depthwise dilated 5x5", (1, 3, 16, 16), (3, 1, 5, 5), (1, 1), (2, 2), "same", 3),
    ("pointwise", (3, 16, 6, 5), (8, 16, 1, 1), (1, 1), (1, 1), "valid", 1),
    ("winograd-size 3x3", (2, 16, 20, 18), (12, 16, 3, 3), (1, 1), (1, 1), "same", 1),
    ("valid non-square", (2, 5, 9, 13), (6, 5, 2, 5), (1, 1), (1, 1), "valid", 1),
]


def pads(h, w, kh, kw, stride, dilation, padding):
    """[top, bottom, left, right] as sepconv resolves them."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding in ("same", "same-lower"):
        out = []
        for size, k, s, d in ((h, kh, stride[0], dilation[0]), (w, kw, stride[1], dilation[1])):
            o = math.ceil(size / s)
            total = max((o - 1) * s + (k - 1) * d + 1 - size, 0)
            half = total // 2
            out.append((half, total - half) if padding == "same" else (total - half, half))
        return [out[0][0], out[0][1], out[1][0], out[1][1]]
    return [int(v) for v in padding.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--sepconv", default=os.path.join(here, "..", "target", "release", "sepconv"))
    args = ap.parse_args()
    if not os.path.exists(args.sepconv):
        print(f"error: {args.sepconv} not found; build it with cargo build --release", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    failed = 0
    with tempfile.TemporaryDirectory() as d:
        for name, xs, ws, stride, dil, padding, groups in CASES:
            x = rng.standard_normal(xs).astype(np.float32)
            w = rng.standard_normal(ws).astype(np.float32)
            b = rng.standard_normal(ws[0]).astype(np.float32)
            t, bo, l, r = pads(xs[2], xs[3], ws[2], ws[3], stride, dil, padding)
            xt = torch.tensor(x, requires_grad=True)
            wt = torch.tensor(w, requires_grad=True)
            bt = torch.tensor(b, requires_grad=True)
            y = F.conv2d(F.pad(xt, (l, r, t, bo)), wt, bt, stride=stride, dilation=dil, groups=groups)
            gy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
            y.backward(torch.tensor(gy))
            files = {k: os.path.join(d, f"{k}.npy") for k in ("x", "w", "b", "gy", "y", "gx", "gw", "gb")}
            for k, v in (("x", x), ("w", w), ("b", b), ("gy", gy)):
                np.save(files[k], v)
            cmd = [
                args.sepconv, "conv", "--input", files["x"], "--weight", files["w"], "--bias", files["b"],
                "--stride", f"{stride[0]},{stride[1]}", "--dilation", f"{dil[0]},{dil[1]}",
                "--padding", padding, "--groups", str(groups), "--output", files["y"],
                "--grad-output", files["gy"], "--grad-input", files["gx"], "--grad-weight", files["gw"],
                "--grad-bias", files["gb"],
            ]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"FAIL {name}: sepconv exited {run.returncode}: {run.stderr.strip()}")
                failed += 1
                continue
            errs = {}
            for k, ref in (("y", y.detach().numpy()), ("gx", xt.grad.numpy()), ("gw", wt.grad.numpy()), ("gb", bt.grad.numpy())):
                got = np.load(files[k])
                scale = max(1.0, float(np.abs(ref).max()))
                errs[k] = float(np.abs(got - ref).max()) / scale if got.shape == ref.shape else float("inf")
            worst = max(errs.values())
            ok = worst <= 1e-4
            failed += not ok
            detail = "  ".join(f"{k} {v:.1e}" for k, v in errs.items())
            print(f"{'ok  ' if ok else 'FAIL'} {name:28s} {detail}")
    print(f"{len(CASES) - failed} of {len(CASES)} cases match PyTorch {torch.__version__} within 1e-4")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
