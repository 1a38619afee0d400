"""Tensor parallelism on two CPU ranks (`tensor_parallel_size=2`): the same answers and image features as one rank.

vLLM splits the LLM's attention heads, MLP and vocabulary over the ranks (its own Llama layers); the vision tower and
projector are built whole on every rank. One rank's answers equal the transformers pipeline's (`test_offline.py`,
200/200 held-out chats), so the pipeline's answers in `shapes_reference.json` stand for the one-rank run here, and the
image features are compared, on every rank, with the ones the transformers model stored (`test_compat.py` compares one
rank's vision part with them the same way).
"""

import functools
import os

import pytest
from conftest import ENGINE_KWARGS
from shapes_reference import CHECKPOINT, FEATURE_IMAGES, FEATURES, examples, load_reference, rank_summary
from test_offline import chat, greedy, report_parity

vllm = pytest.importorskip("vllm")
TP = 2
CPUS = sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def llm():
    if len(CPUS) < TP:  # CI has 2 cores: there a missing rank is a failure, not a skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{TP} ranks need {TP} CPUs, {len(CPUS)} allowed")
    with pytest.MonkeyPatch.context() as env:
        # one core per rank (README: without it vLLM refuses, "Not enough allowed NUMA nodes"); `apply_model` sends
        # a function to the workers, which vLLM allows only with this switch
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cpu) for cpu in CPUS[:TP]))
        env.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        engine = vllm.LLM(model=str(CHECKPOINT), tensor_parallel_size=TP, **ENGINE_KWARGS)
        yield engine
        engine.llm_engine.engine_core.shutdown()


def test_two_ranks_answer_as_one_rank(llm):
    items = examples()
    outputs = llm.chat([chat(item["image"], item["question"]) for item in items], greedy(), use_tqdm=False)
    report_parity([output.outputs[0].text for output in outputs], load_reference())


def test_each_rank_holds_half_the_llm_and_computes_the_one_rank_image_features(llm):
    import torch
    from safetensors.torch import load_file

    from florence_vl import FlorenceVLConfig, FlorenceVLProcessor

    config = FlorenceVLConfig.from_pretrained(CHECKPOINT)
    processor = FlorenceVLProcessor.from_pretrained(CHECKPOINT)
    pixel_values = processor.image_processor([item["image"] for item in examples()[:FEATURE_IMAGES]],
                                             return_tensors="pt")["pixel_values"]

    ranks = llm.apply_model(functools.partial(rank_summary, pixel_values=pixel_values))
    text = config.text_config
    expected = load_file(str(FEATURES))["features"]
    assert len(ranks) == TP
    for rank in ranks:
        assert (rank["heads"], rank["kv_heads"]) == (text.num_attention_heads // TP, text.num_key_value_heads // TP)
        assert rank["qkv_rows"] == (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim // TP
        assert rank["vocab_rows"] < text.vocab_size <= TP * rank["vocab_rows"]  # vocabulary split (padded to 64s)
        torch.testing.assert_close(rank["features"], expected, rtol=1e-4, atol=1e-5)
