from imaml_seg.cli import main

raise SystemExit(main())
