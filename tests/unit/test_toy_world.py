import numpy as np
import pytest

from sepen.stats import bootstrap_ci, paired_difference
from sepen.toy.detect import color_labels, detect, score_image
from sepen.toy.world import CONCEPTS, Placed, pair_split, place, prompt_for, render, shape_mask

NAMES = list(CONCEPTS)


@pytest.mark.parametrize("max_overlap", [0.0, 0.15])
@pytest.mark.parametrize("seed", [0, 1])
def test_detector_finds_exactly_the_rendered_objects(seed, max_overlap):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        k = int(rng.integers(1, 3))
        named = [str(c) for c in rng.choice(NAMES, k, replace=False)]
        objects = place(rng, named, max_overlap=max_overlap)
        assert detect(render(objects)) == {c: 1 for c in named}


@pytest.mark.parametrize("r", [5.0, 6.5, 8.0])
def test_every_concept_alone_at_every_size_and_position_is_found(r):
    for name in NAMES:
        for c in (r + 0.5, 16.0, 31.5 - r):
            assert detect(render([Placed(name, c, 32 - c, r)])) == {name: 1}


def test_an_object_with_another_concepts_shape_does_not_count():
    for colour_of in NAMES:
        for shape_of in NAMES:
            if colour_of == shape_of:
                continue
            image = np.zeros((32, 32, 3), np.uint8)
            image[shape_mask(CONCEPTS[shape_of].shape, 16, 17, 7, 32)] = CONCEPTS[colour_of].color
            assert detect(image) == {}, (colour_of, shape_of)


def test_two_objects_merged_into_one_blob_count_as_neither():
    image = np.zeros((32, 32, 3), np.uint8)
    blob = shape_mask("circle", 12, 16, 6, 32) | shape_mask("bar", 20, 16, 7, 32)
    image[blob] = CONCEPTS["circle"].color
    assert detect(image) == {}


def test_detector_tolerates_colour_noise_of_generated_images():
    rng = np.random.default_rng(5)
    image = render([Placed("star", 10, 10, 7), Placed("ring", 22, 22, 7)]).astype(float)
    noisy = np.clip(image + rng.normal(0, 25, image.shape), 0, 255).astype(np.uint8)
    assert detect(noisy) == {"star": 1, "ring": 1}
    assert (color_labels(render([Placed("bar", 16, 16, 6)])) >= 0).sum() > 0


def test_counts_and_scores():
    image = render(
        [Placed("circle", 8, 8, 5), Placed("circle", 24, 24, 5), Placed("square", 24, 8, 5)]
    )
    counts = detect(image)
    assert counts == {"circle": 2, "square": 1}
    assert score_image(counts, ["circle", "square"]) == {
        "success": 1.0,
        "hit_rate": 1.0,
        "spurious": 0.0,
        "exact_count": 0.0,
    }
    assert score_image(counts, ["circle", "star"]) == {
        "success": 0.0,
        "hit_rate": 0.5,
        "spurious": 1.0,
        "exact_count": 0.0,
    }


def test_bootstrap_ci_on_known_data():
    ci = bootstrap_ci([1.0] * 30 + [0.0] * 70, n_boot=4000)
    assert ci["mean"] == pytest.approx(0.3) and ci["n"] == 100
    # normal approximation: 0.3 +- 1.96 * sqrt(0.21 / 100) = [0.21, 0.39]
    assert ci["lo"] == pytest.approx(0.21, abs=0.02) and ci["hi"] == pytest.approx(0.39, abs=0.02)
    assert bootstrap_ci([0.5] * 10) == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 10}
    diff = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert diff["mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference([1], [1, 0])


def test_pair_split_holds_out_pairs_but_keeps_every_concept():
    trained, held = pair_split(NAMES, 8, seed=0)
    assert len(trained) == 20 and len(held) == 8
    assert not {tuple(p) for p in trained} & {tuple(p) for p in held}
    assert {c for p in trained for c in p} == set(NAMES)
    assert pair_split(NAMES, 8, seed=0) == (trained, held)
    assert pair_split(NAMES, 8, seed=1) != (trained, held)


def test_prompts_follow_the_papers_grammar():
    assert prompt_for(["circle"]) == "a photo of a circle"
    assert prompt_for(["circle", "square"], "with") == "a photo of a circle with a square"


def _scores(objects, named, extra=None):
    from sepen.toy.detect import regions, score_regions

    image = render(objects)
    if extra is not None:
        extra(image)
    return score_regions(regions(image), named)


def _fails(scores):
    return {k for k, v in scores.items() if k.startswith("fail_") and v}


def test_taxonomy_missing_object():
    scores = _scores([Placed("circle", 10, 10, 6)], ["circle", "square"])
    assert scores["success"] == 0.0 and _fails(scores) == {"fail_missing"}


def test_taxonomy_too_small_object():
    def speck(image):  # a 2x2 blue speck: under the detector's minimum area of 8 pixels
        image[24:26, 24:26] = CONCEPTS["square"].color

    scores = _scores([Placed("circle", 10, 10, 6)], ["circle", "square"], speck)
    assert _fails(scores) == {"fail_too_small"}


def test_taxonomy_merged_objects():
    # a blue square drawn over most of the red circle: the circle's rest touches the square
    scores = _scores(
        [Placed("circle", 12, 16, 6), Placed("square", 18, 16, 6)], ["circle", "square"]
    )
    assert scores["hit_rate"] == 0.5 and _fails(scores) == {"fail_merged"}


def test_taxonomy_wrong_shape_and_spurious():
    def red_star(image):  # the circle's colour in the star's shape, apart from the square
        image[shape_mask("star", 8, 8, 6, 32)] = CONCEPTS["circle"].color

    scores = _scores([Placed("square", 24, 24, 6)], ["circle", "square"], red_star)
    assert _fails(scores) == {"fail_wrong_shape"}
    # the same red star where the star is named: the circle took its partner's shape (mixed)
    scores = _scores([Placed("square", 24, 24, 6)], ["circle", "star"], red_star)
    assert _fails(scores) == {"fail_merged", "fail_missing", "fail_spurious"}
    scores = _scores([Placed("circle", 8, 8, 6), Placed("star", 24, 24, 7)], ["circle", "square"])
    assert scores["spurious"] == 1.0 and _fails(scores) == {"fail_missing", "fail_spurious"}


def test_taxonomy_is_empty_for_a_success():
    scores = _scores([Placed("circle", 8, 8, 6), Placed("star", 24, 24, 7)], ["circle", "star"])
    assert scores["success"] == 1.0 and not _fails(scores)
