import os
import sys
from pathlib import Path

# Tiny models on a 2-core machine: extra threads only wait on each other (and on a second process), and
# subprocesses started by the tests inherit these settings.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(1)
