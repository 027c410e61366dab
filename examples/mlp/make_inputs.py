"""Write seeded weights and a sample for examples/mlp/mlp.py (stands in for a trained model)."""

import argparse
from pathlib import Path

import torch

from mlp import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = MLP()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "weights.pt")
    torch.save(torch.randn(4, 64), args.out / "sample.pt")
    print(f"wrote {args.out / 'weights.pt'} and {args.out / 'sample.pt'}")


if __name__ == "__main__":
    main()
