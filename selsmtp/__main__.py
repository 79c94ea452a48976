from selsmtp.cli import main

raise SystemExit(main())
