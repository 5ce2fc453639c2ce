import sys

from shardlog.cli.main import main

sys.exit(main())
