import sys

from lavis.serve.app import main

sys.exit(main())
