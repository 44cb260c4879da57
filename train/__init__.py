"""BrushNet training: Lightning module, BrushData DataModule, CLI."""

from brushnet.console import keep_bitsandbytes_lazy

keep_bitsandbytes_lazy()  # before any train module imports diffusers' models; train.optim imports it for 8-bit Adam
