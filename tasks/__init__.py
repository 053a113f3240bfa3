"""The AI work as plain functions, each exposed through a thin Prefect task."""
from tasks import credentials as _credentials  # noqa: F401 - registers the block resolver
