"""pipeline("image-text-to-text") on a saved tiny random checkpoint loaded with trust_remote_code."""

from threading import Thread

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_config, tiny_processor
from transformers import TextIteratorStreamer, pipeline

from florence_vl import FlorenceVLForConditionalGeneration


MAX_NEW_TOKENS = 3


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversation(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


CONVERSATIONS = [conversation(random_image(0, (64, 64)), "What is this?"),
                 conversation(random_image(1, (30, 90)), "Which colour is the square on the left?")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random tiny checkpoint whose greedy answers to the two conversations differ, so a mix-up would show."""
    folder = tmp_path_factory.mktemp("tiny-florence-vl")
    config = tiny_config()
    processor = tiny_processor(config)
    for seed in range(20):
        torch.manual_seed(seed)
        model = FlorenceVLForConditionalGeneration(config).eval()
        if len({chat_answer(model, processor, messages) for messages in CONVERSATIONS}) == len(CONVERSATIONS):
            break
    else:
        pytest.fail("no seed in 0..19 gives different answers to the two conversations")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    assert type(pipe.model).__module__.startswith("transformers_modules")
    return pipe


def greedy_answer(model, processor, **processor_inputs) -> str:
    """Greedy continuation through model.generate, decoded as the pipeline does."""
    inputs = processor(**processor_inputs, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat_answer(model, processor, messages: list[dict]) -> str:
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return greedy_answer(model, processor, text=prompt, images=messages[0]["content"][0]["image"])


def test_chat_messages(pipe):
    messages = CONVERSATIONS[0]
    outputs = pipe(text=messages, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS})
    assert isinstance(outputs, list) and len(outputs) == 1
    assert outputs[0]["input_text"] == messages
    *history, reply = outputs[0]["generated_text"]
    assert history == messages and reply["role"] == "assistant"
    assert reply["content"] == chat_answer(pipe.model, pipe.processor, messages)


def test_plain_prompt_with_images(pipe):
    image = CONVERSATIONS[0][0]["content"][0]["image"]
    prompt = "<image>What is this?"
    full = pipe(images=image, text=prompt, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS})
    answer = greedy_answer(pipe.model, pipe.processor, text=prompt, images=image)
    assert full == [{"input_text": prompt, "generated_text": prompt + answer}]
    new_only = pipe(images=image, text=prompt, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS},
                    return_full_text=False)
    assert new_only[0]["generated_text"] == answer


@pytest.mark.parametrize("batch_size", [1, 2])
def test_batch_of_conversations(pipe, batch_size):
    outputs = pipe(text=CONVERSATIONS, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS}, return_full_text=False,
                   batch_size=batch_size)
    assert len(outputs) == len(CONVERSATIONS)
    answers = [chat_answer(pipe.model, pipe.processor, messages) for messages in CONVERSATIONS]
    assert answers[0] and answers[0] != answers[1], "the test needs two different answers to catch a mix-up"
    for messages, answer, output in zip(CONVERSATIONS, answers, outputs):
        assert len(output) == 1 and output[0]["input_text"] == messages
        assert output[0]["generated_text"] == answer


def test_streaming_yields_the_non_streamed_text(pipe):
    messages = CONVERSATIONS[1]
    expected = pipe(text=messages, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS}, return_full_text=False)
    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=120)
    worker = Thread(target=pipe, kwargs=dict(
        text=messages, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS, "streamer": streamer},
        return_full_text=False))
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed == expected[0]["generated_text"]
