"""Where the bf16 vision path's CPU time goes: torch.profiler over DaViT and one `get_image_features` call.

    python benchmarks/profile_vision.py > benchmarks/results.cpu.profile_vision.txt

Florence-2-large at 768 px, random weights, bfloat16. Prints the top ops by self CPU time and the largest
`aten::copy_` groups by input shape (layout copies: which tensors get made contiguous, and how often).
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sizes import florence_vl_config  # noqa: E402

from florence_vl import FlorenceVLForConditionalGeneration  # noqa: E402

model = FlorenceVLForConditionalGeneration._from_config(florence_vl_config("large", "toy", 768),
                                                        dtype=torch.bfloat16).eval()
pixels = torch.randn(1, 3, 768, 768, dtype=torch.bfloat16)
with torch.inference_mode():
    model.model.get_image_features(pixels)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model.model.vision_tower.davit(pixels)
        model.model.get_image_features(pixels)
copies = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_"),
                key=lambda e: e.self_cpu_time_total, reverse=True)
total = sum(e.self_cpu_time_total for e in prof.key_averages())
print(f"self CPU total {total / 1e6:.1f} s; aten::copy_ {sum(e.self_cpu_time_total for e in copies) / 1e6:.1f} s")
print("largest aten::copy_ groups: seconds, calls, input shapes")
for event in copies[:12]:
    print(f"{event.self_cpu_time_total / 1e6:6.2f} {event.count:4d} {event.input_shapes}")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
