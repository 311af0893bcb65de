"""`python -m agent` is the same as the `jouleprobe` command."""

from agent.cli import main

raise SystemExit(main())
