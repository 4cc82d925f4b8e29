"""Views of a result store: the paper's tables, ``report.md`` with its figures, W&B payloads."""
