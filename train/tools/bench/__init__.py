"""``python -m train.tools.bench``: the benchmark suite behind ``make bench`` (see :mod:`.suite`)."""
