"""Offline inference: `LLM(...).chat` / `.generate` with images, parity with the transformers pipeline."""

import base64
import io

import pytest
from conftest import ENGINE_KWARGS
from shapes_reference import CHECKPOINT, MAX_NEW_TOKENS, examples, load_reference

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def llm():
    engine = vllm.LLM(model=str(CHECKPOINT), **ENGINE_KWARGS)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def greedy(max_tokens: int = MAX_NEW_TOKENS):
    return vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens)


def chat(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": question}]}]


def test_offline_chat_parity_with_the_transformers_pipeline(llm):
    """200 held-out shapes prompts (seed 777): vLLM's greedy answers equal the pipeline's for >= 99 %."""
    items, reference = examples(), load_reference()
    outputs = llm.chat([chat(item["image"], item["question"]) for item in items], greedy(), use_tqdm=False)
    answers = [output.outputs[0].text for output in outputs]
    report_parity(answers, reference)


def report_parity(answers: list[str], reference: list[dict]) -> None:
    from florence_vl.train.shapes import is_correct

    assert len(answers) == len(reference)
    differences = [(index, record, answer) for index, (record, answer) in enumerate(zip(reference, answers))
                   if answer != record["pipeline"]]
    for index, record, answer in differences:
        print(f"difference #{index} ({record['question']!r}): vLLM {answer!r} vs pipeline {record['pipeline']!r} "
              f"(truth {record['answer']!r})")
    vllm_accuracy = sum(is_correct(answer, record["answer"]) for record, answer in zip(reference, answers))
    pipe_accuracy = sum(is_correct(record["pipeline"], record["answer"]) for record in reference)
    print(f"equal answers {len(answers) - len(differences)}/{len(answers)}; shapes accuracy: vLLM "
          f"{vllm_accuracy / len(answers):.3f}, pipeline {pipe_accuracy / len(answers):.3f}")
    assert len(differences) <= 0.01 * len(answers), f"{len(differences)} of {len(answers)} answers differ"


def test_generate_with_a_prompt_and_an_image(llm):
    item, record = examples()[4], load_reference()[4]
    prompt = f"<|user|>\n<image>\n{item['question']}<|end|>\n<|assistant|>\n"
    output = llm.generate({"prompt": prompt, "multi_modal_data": {"image": item["image"]}}, greedy(),
                          use_tqdm=False)
    assert output[0].outputs[0].text == record["pipeline"]
    assert output[0].prompt_token_ids.count(4) == 17  # `<image>` expanded into num_image_tokens placeholders


def test_chat_with_a_data_url(llm):
    item, record = examples()[3], load_reference()[3]
    buffer = io.BytesIO()
    item["image"].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": item["question"]}]}]
    assert llm.chat(messages, greedy(), use_tqdm=False)[0].outputs[0].text == record["pipeline"]


@pytest.mark.parametrize("markers", [0, 2])
def test_markers_and_images_must_match(llm, markers):
    item = examples()[0]
    prompt = "<|user|>\n" + "<image>\n" * markers + item["question"] + "<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": item["image"]}}, greedy(), use_tqdm=False)
    # the engine still answers afterwards
    assert llm.chat(chat(item["image"], item["question"]), greedy(), use_tqdm=False)[0].outputs[0].text
