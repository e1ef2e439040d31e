from tokenscaler.cli import main

raise SystemExit(main())
