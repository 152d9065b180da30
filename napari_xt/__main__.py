import sys

from napari_xt.cli import main

sys.exit(main())
