from prepare.cli import main

raise SystemExit(main())
