"""One run: its settings, data, model and adapter, training, measurement, generation and scores, its directory.
Imports nothing from study/, analysis/ or the top-level files (tests/test_layout.py)."""
