"""`python -m lowrank` runs the command-line interface."""

from lowrank.cli import main

raise SystemExit(main())
