"""The gate without Lightning: a plain PyTorch loop with a gated auxiliary task.

Main task: classify scikit-learn's bundled 8x8 digits. Auxiliary task: classify the same digits
rotated by ``--angle`` degrees (the paper's section 4.2 setup, on digits instead of MNIST). A shared
MLP trunk, one head per task; ``gate.backward`` writes into ``.grad`` the main gradient plus the
auxiliary one wherever the rule lets it in, and each head gets its own task's gradient.

    python examples/plain_pytorch.py --steps 600 --rule unweighted
    python examples/plain_pytorch.py --rule weighted --angle 180

Nothing is downloaded (the digits ship with scikit-learn).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from lightning_gradsim import GradientGate, list_rules


def rotated_digits(angle: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(train images, their rotated copies, train labels, test images, test labels); a fixed 80/20 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[: int(0.8 * len(y))], order[int(0.8 * len(y)) :]
    if angle % 90:
        raise SystemExit(f"--angle must be a multiple of 90 (rot90 keeps the 8x8 grid), got {angle}.")
    rotated = torch.rot90(x, k=angle // 90, dims=(1, 2))
    return x[train], rotated[train], y[train], x[test], y[test]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="RMSprop's learning rate")
    parser.add_argument("--angle", type=int, default=90, help="rotation of the auxiliary task's images (0/90/180/270)")
    parser.add_argument("--rule", default="unweighted", choices=sorted(list_rules()), help="the gate's rule")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="lambda of the auxiliary task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100, help="print the gate's statistics every N steps")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x, x_rot, y, x_test, y_test = rotated_digits(args.angle, args.seed)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU())
    main_head, aux_head = nn.Linear(100, 10), nn.Linear(100, 10)
    params = [*trunk.parameters(), *main_head.parameters(), *aux_head.parameters()]
    optimizer = torch.optim.RMSprop(params, lr=args.lr)
    gate = GradientGate(rule=args.rule, aux_weight={"rotated": args.aux_weight})

    generator = torch.Generator().manual_seed(args.seed)
    skipped = opened = 0
    for step in range(args.steps):
        batch = torch.randint(len(y), (args.batch_size,), generator=generator)
        main_loss = F.cross_entropy(main_head(trunk(x[batch])), y[batch])
        aux_loss = F.cross_entropy(aux_head(trunk(x_rot[batch])), y[batch])  # same images, rotated

        optimizer.zero_grad()
        stats = gate.backward(main_loss, {"rotated": aux_loss}, trunk.parameters())  # fills .grad
        if not bool(stats.finite):  # a NaN/inf in a loss or gradient: skip, as the mixin does
            skipped += 1
            continue
        optimizer.step()
        opened += int(stats.gate_open.sum())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  main loss {main_loss.item():.3f}  aux loss {aux_loss.item():.3f}  "
                f"cosine {stats.cosine.item():+.3f}  weight {stats.weight.item():.3f}"
            )

    with torch.no_grad():
        error = (main_head(trunk(x_test)).argmax(-1) != y_test).float().mean().item()
    print(
        f"main-task test error {100 * error:.2f} %  (gate open on {opened} of {args.steps - skipped} steps, "
        f"{skipped} skipped)"
    )
    return error


if __name__ == "__main__":
    main()
