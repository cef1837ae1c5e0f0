import sys

from vaultgemma_hf.cli.main import main

sys.exit(main())
