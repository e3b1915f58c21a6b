"""One run: its settings, data, model and adapter, training, measurement, generation and scores, its directory.
Imports the top-level utils.py, and nothing from study/, analysis/ or the other top-level files
(tests/test_layout.py)."""
