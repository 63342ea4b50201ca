"""``python -m lagompy``: the same command line as the ``lagompy`` script."""

from lagompy.cli import main

if __name__ == "__main__":
    main()
