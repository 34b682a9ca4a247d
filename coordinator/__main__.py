"""``python -m coordinator RUNTIME_DIR``: run the coordinator (started by the supervisor)."""

import sys

from coordinator.service import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
