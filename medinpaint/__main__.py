from medinpaint.cli.main import main

raise SystemExit(main())
