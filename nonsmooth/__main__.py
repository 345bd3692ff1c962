from nonsmooth.reports._cli import main

raise SystemExit(main())
