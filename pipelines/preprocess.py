"""`python pipelines/preprocess.py ...` runs the same job as the `hagan-preprocess` command."""

import sys

from hagan_tf.preprocess.beam import main

if __name__ == "__main__":
    sys.exit(main())
