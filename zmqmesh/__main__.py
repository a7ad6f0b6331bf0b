"""`python -m zmqmesh` runs the `zmqmesh` command."""

from zmqmesh.cli import main

raise SystemExit(main())
