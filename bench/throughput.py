"""Training throughput of PSA-ResNet-50 at 48x48, batch 64, Island loss: the engine against a
plain reference pipeline, measured in one run on this machine.

(a) engine     uint8 images resident on the device, batched augmentation there, channels_last,
               bf16 autocast on CUDA (optionally torch.compile): ``fermodel.engine.train_step``.
(b) reference  the usual tutorial pipeline, written here: PIL images, per-sample torchvision
               transforms (flip, affine, colour jitter, ToTensor, Normalize), a DataLoader, an
               eager NCHW fp32 model, the same loss and optimiser.

A step is the whole thing: augmentation, forward, joint loss, backward, optimiser. The engine's
achieved FLOP/s is compared with a matmul ceiling measured in the same run, counted two ways:
torch.utils.flop_counter counts every kernel tap, also those that fall on zero padding, which
at 48x48 was most of PSA's 7x7 and 9x9 taps on the 3x3 and 2x2 maps of the last stages
(the engine's models crop those away, ``PSA.crop_to``; the reference's keep them); "useful" FLOPs
count only the taps that touch the image, with backward taken as twice the forward (input and
weight gradients).

    .venv/bin/python bench/throughput.py [--steps 8] [--compile] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from fermodel.augment import AugmentConfig
from fermodel.config import TrialConfig
from fermodel.data import make_synthetic
from fermodel.engine import MEAN, STD, build_parts, resolve_device, train_step
from fermodel.losses import JointLoss
from fermodel.models import build_model

BATCH = 64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _valid_taps(size: int, kernel: int, stride: int, padding: int) -> int:
    """Pairs (output position, kernel tap) along one axis whose tap lands inside the input."""
    out = (size + 2 * padding - kernel) // stride + 1
    return sum(sum(0 <= o * stride - padding + k < size for k in range(kernel)) for o in range(out))


def useful_conv_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward + backward FLOPs of the model's convolutions over non-padding taps only."""
    macs = []

    def count(conv: nn.Conv2d, inputs, _output):
        n, cin, h, w = inputs[0].shape
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        taps = _valid_taps(h, kh, sh, ph) * _valid_taps(w, kw, sw, pw)
        macs.append(n * taps * (cin // conv.groups) * conv.out_channels)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return 3 * 2 * sum(macs)


def engine(images, labels, device, steps, compile_model):
    config = TrialConfig(batch_size=BATCH, device=str(device), compile=compile_model)
    parts = build_parts(config, 7, device)
    images, labels = images.to(device), labels.to(device)
    aug = AugmentConfig()
    gen = torch.Generator(device=device).manual_seed(0)
    order = torch.randperm(len(labels), device=device)

    def step(i):
        idx = order[(i * BATCH) % (len(labels) - BATCH) :][:BATCH]
        train_step(parts, images[idx], labels[idx], aug, gen)

    for i in range(3):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    seconds = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        step(0)
    x = torch.rand(BATCH, 1, 48, 48, device=device)
    useful = useful_conv_flops(parts.net, x)
    return (
        BATCH * steps / seconds,
        counter.get_total_flops() / seconds * steps,
        useful / seconds * steps,
    )


class PILFaces(Dataset):
    def __init__(self, images, labels):
        self.images = [Image.fromarray(im[0].numpy()) for im in images]
        self.labels = labels.tolist()
        self.transform = T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                T.ColorJitter(brightness=0.2, contrast=0.2),
                T.ToTensor(),
                T.Normalize([MEAN], [STD]),
            ]
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def reference(images, labels, device, steps, backbone="resnet50", attention="psa"):
    model = build_model(backbone, attention).to(device)
    criterion = JointLoss("island", feat_dim=model.num_features).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(PILFaces(images, labels), batch_size=BATCH, shuffle=True, drop_last=True)
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device), y.to(device)
        logits, emb = model(x, return_embedding=True)
        out = criterion(logits, emb, y)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return BATCH * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's model")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = make_synthetic(num_subjects=20, images_per_class=4)  # 560 images
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"PSA-ResNet-50, 48x48x1, batch {BATCH}, {args.steps} timed steps"
    )
    ref = reference(data.images, data.labels, device, args.steps)
    ours, counted, useful = engine(data.images, data.labels, device, args.steps, args.compile)
    ceiling = matmul_ceiling(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"reference pipeline : {ref:9.1f} images/s")
    print(f"engine             : {ours:9.1f} images/s   ({ours / ref:.2f}x the reference)")
    print(f"matmul ceiling     : {ceiling / 1e9:9.1f} GFLOP/s")
    for name, flops in (("counted", counted), ("useful", useful)):
        print(
            f"engine FLOP/s      : {flops / 1e9:9.1f} GFLOP/s {name:8s}"
            f"({100 * flops / ceiling:.0f}% of the ceiling)"
        )
    epoch = 28_709 / ours
    print(f"one FER2013 training epoch (28,709 images) at this rate: {epoch:.1f} s")


if __name__ == "__main__":
    main()
