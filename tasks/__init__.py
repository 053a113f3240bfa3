"""The AI work as plain functions, each exposed through a thin Prefect task."""
