import sys

from rag_backup.cli import main

sys.exit(main())
