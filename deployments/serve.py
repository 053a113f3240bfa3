"""Old name of :mod:`deployments.runner`: ``python -m deployments.serve`` still works."""

from deployments.runner import main

if __name__ == "__main__":
    main()
