import pytest
import torch

from sepen.errors import ConceptNotFoundError
from sepen.tokens import aggregate_token_maps, concept_token_positions


def test_clip_tokenizer_reproduces_stable_diffusion_ids(clip_tokenizer):
    ids = clip_tokenizer("a photo of a cat and a dog").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 537, 320, 1929, 49407]
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer.model_max_length == 77


def test_multi_token_concepts_get_every_sub_token(clip_tokenizer):
    prompt = "a photo of a hippopotamus and a xylophone"
    tokens = clip_tokenizer.convert_ids_to_tokens(clip_tokenizer(prompt).input_ids)
    pos = concept_token_positions(clip_tokenizer, prompt, ["hippopotamus", "xylophone"])
    assert [tokens[p] for p in pos[0]] == ["hippo", "potam", "us</w>"]
    assert [tokens[p] for p in pos[1]] == ["xy", "lo", "phone</w>"]
    assert pos == [[5, 6, 7], [10, 11, 12]]


def test_multi_word_concept_and_case_and_punctuation(clip_tokenizer):
    prompt = "A Teddy Bear, and a BEAR."
    pos = concept_token_positions(clip_tokenizer, prompt, ["bear", "teddy bear"])
    tokens = clip_tokenizer.convert_ids_to_tokens(clip_tokenizer(prompt).input_ids)
    assert [tokens[p] for p in pos[1]] == ["teddy</w>", "bear</w>"]
    assert pos == [[7], [2, 3]]


def test_repeated_word_takes_successive_mentions(clip_tokenizer):
    assert concept_token_positions(clip_tokenizer, "a cat and a cat", ["cat", "cat"]) == [[2], [5]]


def test_concept_order_follows_the_list_not_the_prompt(clip_tokenizer):
    pos = concept_token_positions(clip_tokenizer, "a photo of a cat and a dog", ["dog", "cat"])
    assert pos == [[8], [5]]


@pytest.mark.parametrize(
    "prompt, concepts, message",
    [
        ("a photo of a cat", ["dog"], "concept 'dog' not found in prompt 'a photo of a cat'"),
        ("a catfish", ["cat"], "concept 'cat' not found in prompt 'a catfish'"),
        ("a cat and a cat", ["cat", "cat", "cat"], "named more often than the prompt mentions"),
    ],
)
def test_missing_concept_is_a_clear_error(clip_tokenizer, prompt, concepts, message):
    with pytest.raises(ConceptNotFoundError, match=message):
        concept_token_positions(clip_tokenizer, prompt, concepts)


def test_concept_cut_off_by_max_length_is_a_clear_error(clip_tokenizer):
    prompt = "a " * 80 + "giraffe"
    with pytest.raises(ConceptNotFoundError, match=r"'giraffe' is cut off .*77 tokens"):
        concept_token_positions(clip_tokenizer, prompt, ["giraffe"])
    # the last slot that survives truncation (position 75) is still fine
    ok = "a " * 74 + "giraffe"
    assert concept_token_positions(clip_tokenizer, ok, ["giraffe"]) == [[75]]


def test_sub_token_maps_are_aggregated():
    maps = torch.zeros(2, 3, 3, 6)
    maps[..., 1] = 1.0
    maps[..., 2] = 3.0
    maps[..., 4] = 5.0
    mean = aggregate_token_maps(maps, [[1, 2], [4]], "mean")
    assert mean.shape == (2, 2, 3, 3)
    assert torch.all(mean[0] == 2.0) and torch.all(mean[1] == 5.0)
    assert torch.all(aggregate_token_maps(maps, [[1, 2]], "max")[0] == 3.0)
    assert torch.all(aggregate_token_maps(maps, [[1, 2]], "sum")[0] == 4.0)
    with pytest.raises(ValueError, match="'median'"):
        aggregate_token_maps(maps, [[1]], "median")
