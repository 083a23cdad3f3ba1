from convmaps.cli import main

raise SystemExit(main())
