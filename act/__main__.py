from act.cli.main import main

raise SystemExit(main())
