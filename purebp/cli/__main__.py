import sys

from purebp.cli.main import main

sys.exit(main())
