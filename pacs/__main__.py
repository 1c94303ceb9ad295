"""``python -m pacs`` runs the command line."""

from pacs.cli import main

if __name__ == "__main__":
    main()
