from act.cli import main

raise SystemExit(main())
