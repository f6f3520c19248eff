"""The Island loss weight: the paper's L = L_s + L_IL (lambda = 1) against lambda = 0.01.

Gu & Jin write the joint loss as L = L_s + L_IL (their equation 8), lambda = 1. With the
center term averaged over the batch (as Wen et al.'s code does, fermodel/losses.py), lambda = 1
pulls the 2048-d embedding onto the centers faster than cross-entropy can separate the classes:
training stays at chance. This prints, for each lambda and seed, the best validation and the
test accuracy of ResNet-18 with Island loss on the built-in synthetic set (ResNet-18: the same
loss on the same embedding width class, minutes on a CPU). The study presets use lambda = 0.01
(docs/paper.md). Figures, not a test.

    .venv/bin/python bench/loss_weight.py [--epochs 15] [--seeds 2]
"""

from __future__ import annotations

import argparse
import time

from fermodel.config import TrialConfig
from fermodel.engine import fit, load_trial_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    base = dict(
        dataset="synthetic",
        backbone="resnet18",
        attention="none",
        loss="island",
        epochs=args.epochs,
        plateau_patience=3,
        synthetic_subjects=40,
        synthetic_images_per_class=2,
        device="cpu",
    )
    data = load_trial_data(TrialConfig(**base))
    print(
        f"ResNet-18 + Island loss, synthetic set (40 subjects), {args.epochs} epochs; "
        "chance is 14.3%"
    )
    print(f"{'lambda':>8} {'seed':>5} {'best val %':>11} {'test %':>8} {'seconds':>8}")
    for lam in (1.0, 0.01):
        for seed in range(args.seeds):
            started = time.perf_counter()
            result = fit(TrialConfig(**base, lam=lam, seed=seed), data)
            print(
                f"{lam:>8g} {seed:>5} {100 * result.val['accuracy']:>11.1f} "
                f"{100 * result.test['accuracy']:>8.1f} "
                f"{time.perf_counter() - started:>8.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
