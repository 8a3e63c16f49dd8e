from iws_engine.cli import main

raise SystemExit(main())
