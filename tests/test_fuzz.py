"""Fuzzing the processor, the model and `generate` with hypothesis (quick profile; long: benchmarks/fuzz_long.py).

Every case must end in a valid output or in a `ValueError`/`TypeError` whose message names the problem; anything
else (an `IndexError`/`RuntimeError`/`KeyError` from deep inside, a hang, a wrong placeholder or image count)
is a failure. The strategies and the checker live here so that the long profile runs exactly the same cases.
"""

import signal
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny import IMAGE_TOKEN_ID, tiny_config, tiny_processor

from florence_vl import FlorenceVLForConditionalGeneration

IMAGE_TOKEN = "<image>"
NUM_IMAGE_TOKENS = 5  # tiny_config(): 64-px images, a 2x2 grid + 1 pooled token
IMAGE_SIDE = 64
CASE_DEADLINE_S = 30  # a case that takes longer counts as a hang
# Words an error message may use to name what is wrong with a case's input.
PROBLEM_WORDS = ("image", "text", "input", "array", "tensor", "dtype", "shape", "length", "token", "pad", "truncat",
                 "pixel_values")
# Padding/truncation combinations the fuzzer draws on purpose make the tokenizer warn.
pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored", "ignore::RuntimeWarning")
QUICK = settings(max_examples=100, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
                 suppress_health_check=list(HealthCheck))


def _pil_modes() -> list[str]:
    """The modes this Pillow can create (deprecated ones such as BGR;15 may be gone)."""
    modes = []
    for mode in ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "La", "PA", "RGBX",
                 "RGBa", "I;16", "I;16L", "I;16B", "I;16N"):
        try:
            Image.new(mode, (1, 1))
        except (ValueError, OSError):
            continue
        modes.append(mode)
    return modes


PIL_MODES = _pil_modes()
ARRAY_DTYPES = ("uint8", "bool", "int8", "int16", "int32", "int64", "uint16", "float16", "float32", "float64",
                "complex64", "object")
TENSOR_DTYPES = (torch.uint8, torch.bool, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                 torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------- strategies


@st.composite
def image_sizes(draw) -> tuple[int, int]:
    """Mostly 1..96 px per side; rarely up to 8000 (Image.new keeps big images cheap)."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.integers(1, 8000)), draw(st.integers(1, 8000))
    return draw(st.integers(1, 96)), draw(st.integers(1, 96))


@st.composite
def pil_images(draw) -> Image.Image:
    mode = draw(st.sampled_from(PIL_MODES))
    image = Image.new(mode, draw(image_sizes()))
    if mode in ("P", "PA") and draw(st.booleans()):
        image.putpalette(list(range(256)) * 3)
        image.info["transparency"] = 0
    return image


def _array_values(seed: int, shape: tuple[int, ...], dtype: str, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "object":
        return np.full(shape, None, dtype=object)
    values = rng.uniform(-0.1 * scale, scale, size=shape)
    if dtype == "bool":
        return values > scale / 2
    if dtype.startswith("float") and values.size and rng.integers(0, 5) == 0:
        values.flat[0] = rng.choice([np.nan, np.inf, -np.inf])
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range casts are part of the fuzzing
        return values.astype(dtype) if not dtype.startswith(("int", "uint")) else np.abs(values).astype(dtype)


@st.composite
def arrays(draw) -> np.ndarray:
    """numpy arrays of any rank 0..5 and dtype, image-like (HWC/CHW) or not, values in or out of range."""
    rank = draw(st.integers(0, 5))
    shape = tuple(draw(st.integers(0, 40)) for _ in range(rank))
    if rank == 3 and draw(st.booleans()):  # image-like layouts are likelier to reach the deeper code
        side = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
        channels = draw(st.sampled_from([1, 2, 3, 4, 5]))
        shape = (*side, channels) if draw(st.booleans()) else (channels, *side)
    dtype = draw(st.sampled_from(ARRAY_DTYPES))
    scale = draw(st.sampled_from([1.0, 255.0, 70000.0]))
    return _array_values(draw(st.integers(0, 2**32 - 1)), shape, dtype, scale)


@st.composite
def tensors(draw) -> torch.Tensor:
    array = draw(arrays())
    if array.dtype == object or array.dtype == np.uint16:
        array = array.astype(np.float32) if array.dtype == np.uint16 else np.zeros(array.shape, np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(draw(st.sampled_from(TENSOR_DTYPES))) if draw(st.booleans()) else tensor


NOT_IMAGES = (None, 0, 3.5, "", "not-an-image", "/no/such/file.png", b"\x89PNG", [], {}, object())


def images() -> st.SearchStrategy:
    """One image-ish input: PIL in every mode (3 times in 4), numpy, torch, or something that is not an image."""
    return st.one_of(*[pil_images()] * 9, arrays(), tensors(), st.sampled_from(NOT_IMAGES))


def texts() -> st.SearchStrategy:
    """Unicode (empty included, no surrogates) with 0..5 `<image>` markers at random places."""
    chunk = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
    return st.lists(chunk, min_size=1, max_size=6).map(IMAGE_TOKEN.join)


@dataclass
class Case:
    """One call: processor(text=..., images=..., **processor_kwargs), then generate if that succeeded."""

    text: object
    images: object
    processor_kwargs: dict = field(default_factory=dict)
    max_new_tokens: int = 2


@st.composite
def cases(draw) -> Case:
    batch = draw(st.integers(1, 3))
    samples = [draw(texts()) for _ in range(batch)]
    counts = [sample.count(IMAGE_TOKEN) for sample in samples]
    if draw(st.integers(0, 2)):  # usually one image per marker, else 0..5 images whatever the markers say
        per_sample = [[draw(images()) for _ in range(count)] for count in counts]
    else:
        per_sample = [[draw(images()) for _ in range(draw(st.integers(0, 5)))] for _ in samples]
    layout = draw(st.sampled_from(["nested", "flat", "single", "none"]))
    flat = [image for sample_images in per_sample for image in sample_images]
    if layout == "nested":
        image_input = per_sample
    elif layout == "single" and len(flat) == 1:
        image_input = flat[0]
    elif layout == "none" and not flat:
        image_input = None
    else:
        image_input = flat
    text = samples[0] if batch == 1 and draw(st.booleans()) else samples
    if draw(st.integers(0, 9)) == 0:
        text = None  # images only: pixel_values without input_ids
    kwargs = {"return_tensors": "pt"}
    kwargs["padding"] = draw(st.sampled_from([True, False, "longest", "max_length"]))
    max_length = draw(st.one_of(st.none(), st.integers(0, 12), st.integers(13, 200), st.just(10**6)))
    if max_length is not None:
        kwargs["max_length"] = max_length
        kwargs["truncation"] = draw(st.booleans())
    return Case(text, image_input, kwargs, draw(st.integers(1, 3)))


@st.composite
def pixel_value_inputs(draw) -> torch.Tensor:
    """pixel_values handed straight to the model: any rank, dtype, channel count and size."""
    rank = draw(st.sampled_from([0, 1, 2, 3, 4, 4, 4, 5]))
    shape = [draw(st.integers(0, 3)) for _ in range(rank)]
    if rank == 4:
        shape = [1, draw(st.sampled_from([3, 3, 1, 2, 4])), draw(st.sampled_from([64, 64, 0, 1, 31, 96])), 64]
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                  torch.int64, torch.uint8, torch.bool]))
    return (torch.rand(shape) * 2 - 1).to(dtype)


# ---------------------------------------------------------------------------------------------------- checking


class CaseTimeout(Exception):
    pass


@contextmanager
def deadline(seconds: int):
    """Raise CaseTimeout if the block runs longer than `seconds` (a hang); main thread only."""

    def expire(signum, frame):
        raise CaseTimeout(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_clear_error(error: Exception) -> None:
    """A ValueError/TypeError must say what is wrong, not just fail."""
    message = str(error).lower()
    assert message and any(word in message for word in PROBLEM_WORDS), f"unclear message: {error!r}"


def count_images(images) -> int:
    """Images in a (nested) image input; a 4-D array or tensor is a batch."""
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(count_images(item) for item in images)
    return images.shape[0] if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4 else 1


def check_processor_output(case: Case, inputs) -> int:
    """Placeholders per row = markers x N, one pixel tensor per marker, lengths within max_length."""
    if case.text is None:
        assert "input_ids" not in inputs and inputs["pixel_values"].shape == (
            count_images(case.images), 3, IMAGE_SIDE, IMAGE_SIDE), f"images only: {dict(inputs)}"
        return 0
    samples = [case.text] if isinstance(case.text, str) else case.text
    markers = [sample.count(IMAGE_TOKEN) for sample in samples]
    ids = inputs["input_ids"]
    assert ids.shape[0] == len(samples), f"{ids.shape[0]} rows for {len(samples)} texts"
    placeholders = (ids == IMAGE_TOKEN_ID).sum(1).tolist()
    assert placeholders == [count * NUM_IMAGE_TOKENS for count in markers], f"{placeholders} for {markers} markers"
    if case.processor_kwargs.get("truncation"):
        assert ids.shape[1] <= case.processor_kwargs["max_length"], f"truncation kept {ids.shape[1]} tokens"
    assert inputs["attention_mask"].shape == ids.shape
    pixel_values = inputs.get("pixel_values")
    if sum(markers):
        assert pixel_values.shape == (sum(markers), 3, IMAGE_SIDE, IMAGE_SIDE), f"pixel_values {pixel_values.shape}"
        assert torch.isfinite(pixel_values).all(), "non-finite pixel_values"
    else:
        assert pixel_values is None, f"no {IMAGE_TOKEN} in the text but pixel_values of shape {pixel_values.shape}"
    return ids.shape[1]


def check_generate_output(model, inputs, max_new_tokens: int) -> None:
    """generate returns prompt + continuation and never the image token."""
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(output[:, :prompt_length], inputs["input_ids"])
    assert prompt_length < output.shape[1] <= prompt_length + max_new_tokens
    assert not (output[:, prompt_length:] == IMAGE_TOKEN_ID).any()


def run_case(processor, model, case: Case) -> str:
    """'valid', 'ValueError' or 'TypeError'; any other exception (or a failed check) propagates."""
    try:
        with deadline(CASE_DEADLINE_S):
            inputs = processor(text=case.text, images=case.images, **case.processor_kwargs)
            prompt_length = check_processor_output(case, inputs)
            if 0 < prompt_length <= model.config.text_config.max_position_embeddings:
                # No text or an empty prompt has nothing to continue; a prompt padded past the LLM's context
                # (max_length=10**6 with padding="max_length") is the caller's choice and would only measure memory.
                check_generate_output(model, inputs, case.max_new_tokens)
    except (ValueError, TypeError) as error:
        check_clear_error(error)
        return type(error).__name__
    return "valid"


def run_pixel_values(model, pixel_values: torch.Tensor) -> str:
    """The model called directly with one image's placeholders and arbitrary pixel_values."""
    input_ids = torch.tensor([[IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS + [20, 21]])
    try:
        with deadline(CASE_DEADLINE_S):
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        assert logits.shape[:2] == input_ids.shape and torch.isfinite(logits).all()
    except (ValueError, TypeError) as error:
        check_clear_error(error)
        return type(error).__name__
    return "valid"


def build_model_and_processor():
    config = tiny_config()
    torch.manual_seed(0)
    return FlorenceVLForConditionalGeneration(config).eval(), tiny_processor(config)


# ------------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def model_and_processor():
    return build_model_and_processor()


def test_fuzz_processor_model_generate(model_and_processor):
    model, processor = model_and_processor
    outcomes = []

    @QUICK
    @given(cases())
    def check(case):
        with torch.no_grad():
            outcomes.append(run_case(processor, model, case))

    check()
    assert "valid" in outcomes and "ValueError" in outcomes, f"the strategies miss a whole outcome: {outcomes}"


def test_fuzz_pixel_values_given_to_the_model(model_and_processor):
    model, _ = model_and_processor

    @QUICK
    @given(pixel_value_inputs())
    def check(pixel_values):
        with torch.no_grad():
            run_pixel_values(model, pixel_values)

    check()


def test_deadline_turns_a_hang_into_a_failure():
    with pytest.raises(CaseTimeout):
        with deadline(1):
            signal.pause()


# ------------------------------------------------------------------------------- minimal inputs the fuzzer found


def test_text_only_batch_with_one_empty_image_list_per_text(model_and_processor):
    """images=[[], []] (a chat dataset's text-only samples) means no images, not an unusable pixel_values=[]."""
    model, processor = model_and_processor
    inputs = processor(text=["a", "bc"], images=[[], []], padding=True, return_tensors="pt")
    assert "pixel_values" not in inputs
    check_generate_output(model, inputs, max_new_tokens=2)


def test_bfloat16_tensor_image_equals_the_float32_one(model_and_processor):
    _, processor = model_and_processor
    image = torch.rand(3, 40, 30).to(torch.bfloat16)
    as_bf16 = processor(text="<image>", images=image, return_tensors="pt")["pixel_values"]
    as_fp32 = processor(text="<image>", images=image.float(), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(as_bf16, as_fp32)


def test_premultiplied_alpha_la_image_is_converted(model_and_processor):
    _, processor = model_and_processor
    values = processor(text="<image>", images=Image.new("La", (20, 10), (100, 255)), return_tensors="pt")
    grey = processor(text="<image>", images=Image.new("RGB", (20, 10), (100, 100, 100)), return_tensors="pt")
    torch.testing.assert_close(values["pixel_values"], grey["pixel_values"])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_pixel_values_raise_instead_of_being_read_as_normalised(model_and_processor, dtype):
    """Raw 0..255 pixels handed to the model would otherwise give features of a different image, silently."""
    model, _ = model_and_processor
    input_ids = torch.tensor([[IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS + [20]])
    with pytest.raises(TypeError, match=r"pixel_values must be floating point .*" + str(dtype).split(".")[1]):
        model(input_ids=input_ids, pixel_values=torch.ones(1, 3, IMAGE_SIDE, IMAGE_SIDE, dtype=dtype))


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (1, 4, 64, 64), (1, 3, 1, 64), (1, 3, 0, 64)])
def test_pixel_values_of_the_wrong_channels_or_size_raise_naming_the_shape(model_and_processor, shape):
    model, _ = model_and_processor
    input_ids = torch.tensor([[IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS + [20]])
    with pytest.raises(ValueError, match=r"pixel_values must be .*got \(" + ", ".join(map(str, shape))):
        model(input_ids=input_ids, pixel_values=torch.rand(shape))
