"""`python -m dynrules …` is the `dynrules` command."""

from dynrules.cli import main

main()
