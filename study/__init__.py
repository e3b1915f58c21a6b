"""Many runs, read from their results.json: the study command, comparable sets pooled over seeds, statistics,
the report and its figures. Never imports torch, so that `compare` answers without it (tests/test_layout.py)."""
