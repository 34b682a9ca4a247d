"""``python -m coordinator RUNTIME_DIR [LOG_LEVEL LOG_FORMAT]``: started by the supervisor."""

import sys

from coordinator.service import main

if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
