"""BrushNet training: Lightning module, BrushData DataModule, CLI."""
