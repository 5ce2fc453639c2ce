import sys

from shardlog.cli import main

sys.exit(main())
