import sys

from cwsnet.cli import main

sys.exit(main())
