"""`python -m sdesbench` is the same as the `sdesbench` console script."""
from sdesbench.cli import main

if __name__ == "__main__":
    main()
