"""``python -m forge_ray`` is the ``forge-ray`` command."""

from forge_ray.cli import main

raise SystemExit(main())
