"""Saved runs: the shape of a run's weight update, and its text (update_shape.py, without torch, which the report
reads too). Imports from pipeline/, never from study/ (tests/test_layout.py)."""
