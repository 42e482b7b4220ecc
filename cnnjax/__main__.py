"""`python -m cnnjax <command>`; see `cnnjax.cli`."""

from cnnjax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
