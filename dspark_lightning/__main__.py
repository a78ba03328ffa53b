"""``python -m dspark_lightning <command>``; see ``dspark_lightning.cli``."""

from .cli import main

if __name__ == "__main__":
    main()
