import sys

from llmforge.cli import main

sys.exit(main())
