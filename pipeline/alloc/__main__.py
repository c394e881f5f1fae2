from pipeline.alloc import main

raise SystemExit(main())
