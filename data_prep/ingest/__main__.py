"""`python -m data_prep.ingest ...`: the command line (data_prep/ingest/cli.py)."""

from data_prep.ingest.cli import main

if __name__ == "__main__":
    # argparse would name the program after sys.argv[0], now .../ingest/__main__.py; keep the
    # usage line the single-module data_prep/ingest.py printed
    main(prog="ingest.py")
