"""BrushBench / EditBench evaluation: benchmark layout and generation, metrics, model-based scorers, reports.

Modules: :mod:`.benchmark` (mapping file, resumable generation), :mod:`.metrics` (PSNR / MSE / LPIPS on the
preserved region), :mod:`.scorers` (CLIP similarity, ImageReward, HPS v2.1, aesthetic score from local
weights), :mod:`.evaluate` (scoring a generated folder, the in-training subset evaluation), :mod:`.report`
(CSV, markdown, best/worst grids), :mod:`.cli` (``brushnet evaluate``).
"""
