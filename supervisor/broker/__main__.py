"""``python -m supervisor.broker CONFIG.toml``: the embedded broker's child process."""

import sys

from supervisor.broker.supervised import main

sys.exit(main())
