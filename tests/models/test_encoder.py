"""EncoderHalf: prompt preparation, one vision forward per batch, the image-feature cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mmdisagg.core import HASH_BLOCK_TOKENS
from mmdisagg.models.base import EncoderHalf
from mmdisagg.models.errors import InputError
from mmdisagg.models.image_cache import ImageCache
from tests.models.fixtures import TinyModel, image_part, text_part, user

CAT = image_part(84, 84, seed=21)
DOG = image_part(112, 56, seed=22)
BOAT = image_part(56, 112, seed=23)


@pytest.fixture
def vision_calls(tiny: TinyModel) -> Iterator[list[int]]:
    """Patches seen by each vision-tower forward."""
    calls: list[int] = []
    hook = tiny.encoder.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    yield calls
    hook.remove()


def test_total_tokens_are_known_before_the_vision_forward(tiny: TinyModel,
                                                         vision_calls: list[int]) -> None:
    prepared = tiny.encoder.prepare(user(CAT, text_part("and"), DOG))
    assert vision_calls == []
    image_tokens = sum(image.num_tokens for image in prepared.images)
    assert image_tokens == (6 * 6 + 8 * 4) // 4
    assert prepared.total_tokens == tiny.encoder.encode([prepared])[0].embeddings.shape[0]


def test_one_vision_forward_for_all_images_of_a_batch(tiny: TinyModel,
                                                      vision_calls: list[int]) -> None:
    requests = [user(CAT, text_part("a")), user(DOG, BOAT), user(text_part("b"), CAT)]
    prepared = [tiny.encoder.prepare(messages) for messages in requests]
    batched = tiny.encoder.encode(prepared)
    distinct_patches = sum(image.pixel_values.shape[0] for image in prepared[0].images
                           + prepared[1].images)
    assert vision_calls == [distinct_patches]
    for prompt, alone in zip(batched, (tiny.encoder.encode([p])[0] for p in prepared),
                             strict=True):
        torch.testing.assert_close(prompt.embeddings, alone.embeddings, rtol=1e-5, atol=1e-5)
        assert torch.equal(prompt.positions, alone.positions)


def test_cache_hit_skips_the_vision_tower(tiny: TinyModel, vision_calls: list[int]) -> None:
    cache = ImageCache(max_bytes=10**8)
    first = tiny.encoder.encode([tiny.encoder.prepare(user(CAT, text_part("one")))], cache)[0]
    assert len(vision_calls) == 1 and len(cache) == 1
    again = tiny.encoder.encode([tiny.encoder.prepare(user(text_part("two"), CAT))], cache)[0]
    assert len(vision_calls) == 1 and cache.hits == 1
    image_rows = first.token_ids == tiny.encoder.image_token_id
    assert torch.equal(again.embeddings[again.token_ids == tiny.encoder.image_token_id],
                       first.embeddings[image_rows])
    tiny.encoder.encode([tiny.encoder.prepare(user(CAT, DOG))], cache)
    assert vision_calls[-1] == tiny.encoder.prepare(user(DOG)).images[0].pixel_values.shape[0]


def test_an_image_sent_again_is_not_decoded_again(tiny: TinyModel) -> None:
    """The encoder half keeps processed images by their bytes: the same bytes again (each
    turn of a chat resends them) give the same processed image without decoding; other
    bytes, or the same at another detail, are processed anew."""
    prepared = tiny.encoder.prepared_images
    assert prepared is not None  # on by default
    cat = image_part(84, 84, seed=31)
    first = tiny.encoder.prepare(user(cat, text_part("one")))
    hits, misses = prepared.hits, prepared.misses
    again = tiny.encoder.prepare(user(text_part("two"), cat))
    assert (prepared.hits, prepared.misses) == (hits + 1, misses)
    assert again.images[0] is first.images[0]
    low = {**cat, "image_url": {**cat["image_url"], "detail": "low"}}
    small = tiny.encoder.prepare(user(low)).images[0]
    other = tiny.encoder.prepare(user(image_part(84, 84, seed=32))).images[0]
    assert (prepared.hits, prepared.misses) == (hits + 1, misses + 2)
    assert small.num_tokens < first.images[0].num_tokens
    assert other.content_hash != first.images[0].content_hash
    assert prepared.bytes_used == sum(entry.nbytes for entry in prepared._entries.values())
    assert prepared.bytes_used <= prepared.max_bytes


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "message 1: 'role' must be one of"),
    ([{"role": "user", "content": 42}], "message 1: 'content' must be a string or a list"),
    (user({"type": "audio"}), "message 1, part 1: unsupported content part type 'audio'"),
    (user({"type": "text", "text": None}), "needs a string 'text'"),
    (user({"type": "image_url", "image_url": {}}), "needs 'image_url'"),
    (user(text_part("sneaky <|image_pad|>")), "may not contain the image placeholder"),
])
def test_malformed_messages(tiny: TinyModel, messages: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        tiny.encoder.prepare(messages)


def test_prompt_longer_than_the_model_takes(tiny: TinyModel) -> None:
    encoder = EncoderHalf.from_pretrained(tiny.path, max_model_len=20)
    with pytest.raises(InputError, match="this model takes fewer than 20"):
        encoder.prepare(user(CAT))


def test_text_too_large_for_the_model_is_refused_before_tokenizing(tiny: TinyModel) -> None:
    """Megabytes of text are refused by their size alone (tokenizing 10 MB takes seconds);
    text under that bound is tokenized and refused by its count: the bound never refuses a
    prompt that could fit."""
    encoder = EncoderHalf.from_pretrained(tiny.path, max_model_len=64)
    limit = encoder.max_text_bytes
    text = "a fox, " * (limit // 7 + 1)
    with pytest.raises(InputError, match=f"text is {len(text)} bytes; .* more than {limit}"):
        encoder.prepare(user(text_part(text)))
    with pytest.raises(InputError, match="tokens; this model takes fewer than 64"):
        encoder.prepare(user(text_part(text[:limit])))
    tokens = len(encoder.tokenizer.encode(text[:limit]))
    assert tokens >= limit / (encoder.max_text_bytes / encoder.max_model_len)


def test_image_url_as_plain_string_and_null_content(tiny: TinyModel) -> None:
    url = CAT["image_url"]["url"]
    messages = [{"role": "system", "content": None},
                {"role": "user", "content": [{"type": "image_url", "image_url": url}]}]
    assert len(tiny.encoder.prepare(messages).images) == 1


def test_images_inside_a_cached_prefix_skip_the_vision_tower(tiny: TinyModel,
                                                              vision_calls: list[int]) -> None:
    prepared = tiny.encoder.prepare(user(CAT, text_part("and"), DOG))
    full = tiny.encoder.encode([prepared])[0]
    cat, dog = prepared.images
    cat_end = prepared.image_starts[0] + cat.num_tokens
    before = tiny.encoder.images_encoded
    skipped = tiny.encoder.encode([prepared], cached_tokens=[cat_end])[0]
    assert vision_calls[-1] == dog.pixel_values.shape[0]
    assert tiny.encoder.images_encoded == before + 1
    torch.testing.assert_close(skipped.embeddings[cat_end:], full.embeddings[cat_end:])
    assert not skipped.embeddings[prepared.image_starts[0]:cat_end].any()
    assert torch.equal(skipped.positions, full.positions)
    tiny.encoder.encode([prepared], cached_tokens=[cat_end - 1])  # cat not wholly cached
    assert vision_calls[-1] == cat.pixel_values.shape[0] + dog.pixel_values.shape[0]



def test_a_prompt_merged_stage_by_stage_equals_one_merge(tiny: TinyModel) -> None:
    """As the encode server does: the text and positions once, then each stage's images into
    the same prompt (an image met again later in the prompt with its first place)."""
    prepared = tiny.encoder.prepare(user(CAT, text_part("and"), DOG, text_part("again"), CAT))
    whole = tiny.encoder.encode([prepared])[0]
    cat, dog, _ = prepared.images
    merged = None
    for stage in ([cat], [dog]):
        features = tiny.encoder.image_features(stage, None, 0)
        same = [image for image in prepared.images if image.content_hash in features]
        merged = tiny.encoder.merge(prepared, same, features, merged)
        if stage == [cat]:  # the dog's rows are not there yet
            dog_rows = slice(prepared.image_starts[1], prepared.image_starts[1] + dog.num_tokens)
            assert not merged.embeddings[dog_rows].any()
    assert torch.equal(merged.embeddings, whole.embeddings)
    assert torch.equal(merged.positions, whole.positions)
    assert merged.mrope_delta == whole.mrope_delta
    if whole.deepstack is not None:
        assert torch.equal(merged.deepstack, whole.deepstack)
        assert torch.equal(merged.visual_mask, whole.visual_mask)

def test_block_hashes_key_images_by_their_pixels(tiny: TinyModel) -> None:
    """Two images of one size have the same placeholder tokens, but never the same hashes; the
    same image gives the same hashes, and elsewhere in the prompt it changes what follows."""
    size = HASH_BLOCK_TOKENS

    def hashes(*parts) -> list[bytes]:
        return tiny.encoder.prepare(user(*parts)).block_hashes()

    cat, other_cat = hashes(CAT, text_part("x")), hashes(image_part(84, 84, seed=99),
                                                          text_part("x"))
    prepared = tiny.encoder.prepare(user(CAT, text_part("x")))
    first_image_block = prepared.image_starts[0] // size
    assert cat[:first_image_block] == other_cat[:first_image_block]
    assert all(a != b for a, b in zip(cat[first_image_block:], other_cat[first_image_block:],
                                      strict=True))
    assert hashes(CAT, text_part("x")) == cat
    moved = hashes(text_part("x"), CAT)
    assert moved[first_image_block:] != cat[first_image_block:]
