"""Prefect flows: compose tasks, branch on their results, fan out. No file or tensor work."""
