import sys

from ddim_lab.report.main import main

sys.exit(main())
