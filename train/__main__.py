"""``python -m train fit --config configs/tiny_cpu.yaml`` (same as ``brushnet-train``)."""

from train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
