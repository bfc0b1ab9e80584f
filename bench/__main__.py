import sys

from sts_edge.bench.latency import main

sys.exit(main())
