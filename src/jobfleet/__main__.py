"""`python -m jobfleet` runs the command line."""

from jobfleet.cli import program

program()
