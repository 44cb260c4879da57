import sys

from train.tools.bench.suite import main

sys.exit(main())
