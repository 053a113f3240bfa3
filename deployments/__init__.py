"""How flows run: Prefect API bootstrap, Dask cluster factory, progress, deployment scripts."""
