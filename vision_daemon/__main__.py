from vision_daemon.cli import main

raise SystemExit(main())
