"""Run the command line as ``python -m sovbackupd``."""

from sovbackupd.cli import main

raise SystemExit(main())
