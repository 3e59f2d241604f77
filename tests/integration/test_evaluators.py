"""Real-model metrics on tiny random models built from configs, and the protocol arithmetic."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sepen.errors import ModelNotAvailableError
from sepen.evaluators.protocol import (
    cosine,
    detection_outcome,
    min_object_score,
    object_phrases,
    template_average,
)

# ---------------------------------------------------------------- protocol arithmetic


def test_object_phrases_split_at_and_or_with():
    assert object_phrases("a photo of a cat and a dog") == ["a photo of a cat", "a dog"]
    assert object_phrases("a horse with a glasses") == ["a horse", "a glasses"]
    assert object_phrases("a bird") == ["a bird"]
    assert object_phrases("a cat And a bowl with a dog") == ["a cat", "a bowl", "a dog"]
    assert object_phrases("a sandwich") == ["a sandwich"]  # 'and' inside a word stays
    assert min_object_score([0.31, 0.27, 0.4]) == 0.27


def test_template_average_is_the_renormalised_mean_of_unit_embeddings():
    vectors = {"x a": torch.tensor([3.0, 0.0]), "x b": torch.tensor([0.0, 5.0])}
    templates = [lambda c: f"{c} a", lambda c: f"{c} b"]
    mean = template_average(lambda texts: torch.stack([vectors[t] for t in texts]), "x", templates)
    assert torch.allclose(mean, torch.tensor([1.0, 1.0]) / 2**0.5)
    assert torch.allclose(cosine(torch.tensor([[1.0, 0.0]]), mean[None]), torch.tensor([0.5**0.5]))


def test_detection_outcome_from_given_boxes():
    boxes = [("cat", 0.9), ("dog", 0.25), ("bowl", 0.5), ("cat", 0.1)]
    assert detection_outcome(boxes, ["cat", "dog"], 0.3) == {
        "detection_success": 0.0,
        "detection_hit_rate": 0.5,
        "detection_spurious": 1.0,
    }
    assert detection_outcome(boxes, ["cat", "dog"], 0.2)["detection_success"] == 1.0
    assert detection_outcome([], ["cat"], 0.3)["detection_hit_rate"] == 0.0


def test_bootstrap_ci_on_known_data():
    from sepen.stats import bootstrap_ci, paired_difference

    ci = bootstrap_ci([0, 1] * 500, n_boot=2000, seed=0)
    assert ci["mean"] == 0.5 and ci["n"] == 1000
    assert 0.46 < ci["lo"] < 0.48 and 0.52 < ci["hi"] < 0.54  # +-1.96 * 0.5 / sqrt(1000)
    const = paired_difference([1.0] * 10, [0.0] * 10)
    assert (const["lo"], const["mean"], const["hi"]) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A tiny BLIP captioner with a small word-piece vocabulary, saved with save_pretrained."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "photo", "[DEC]"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=32)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        text_config={
            **small,
            "intermediate_size": 37,
            "vocab_size": len(words),
            "max_position_embeddings": 32,
            "bos_token_id": words.index("[DEC]"),
            "sep_token_id": words.index("[SEP]"),
            "pad_token_id": 0,
            "encoder_hidden_size": 32,
        },
        vision_config={**small, "intermediate_size": 37, "image_size": 32, "patch_size": 16},
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory):
    """A tiny OWLv2 detector with the real CLIP tokenizer, saved with save_pretrained."""
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    folder = tmp_path_factory.mktemp("owlv2")
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Owlv2Config(
        text_config={**small, "intermediate_size": 37, "max_position_embeddings": 16},
        vision_config={**small, "intermediate_size": 37, "image_size": 64, "patch_size": 16},
        projection_dim=32,
    )
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    from sepen.models import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()  # its own copy: the session's stays at 77 tokens
    tokenizer.model_max_length = 16
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    ).save_pretrained(folder)
    return str(folder)


def _images(n=3, size=48):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


PROMPTS = [
    {"prompt": "a photo of a cat and a dog", "concepts": ["cat", "dog"]},
    {"prompt": "a cat with a dog", "concepts": ["cat", "dog"]},
    {"prompt": "a dog and a cat", "concepts": ["dog", "cat"]},
]


def test_clip_scores_are_cosines_of_open_clip_embeddings(tiny_clip):
    from sepen.evaluators.clip import ClipScorer

    scorer = ClipScorer(tiny_clip, None, "cpu", batch_size=2)
    images = _images()
    rows = scorer(images, PROMPTS)
    img = scorer.encode_images(images)
    full = cosine(img, scorer.encode_text([p["prompt"] for p in PROMPTS]))
    assert [r["clip_full"] for r in rows] == pytest.approx(full.tolist(), abs=1e-5)
    parts = scorer.encode_text(["a photo of a cat", "a dog"])
    expected = min(float(cosine(img[:1], parts[k : k + 1])[0]) for k in range(2))
    assert rows[0]["clip_min_object"] == pytest.approx(expected, abs=1e-5)
    assert all(-1 <= r["clip_min_object"] <= 1 for r in rows)


def test_blip_similarity_compares_the_caption_with_the_template_averaged_prompt(
    tiny_clip, tiny_blip
):
    from sepen.evaluators.blip import BlipScorer, imagenet_templates
    from sepen.evaluators.clip import ClipScorer

    clip = ClipScorer(tiny_clip, None, "cpu")
    blip = BlipScorer(tiny_blip, clip, "cpu", max_new_tokens=5, batch_size=2)
    images = _images(2)
    rows = blip(images, PROMPTS[:2])
    assert len(imagenet_templates()) == 80
    for r, p in zip(rows, PROMPTS[:2]):
        prompt = template_average(clip.encode_text, p["prompt"], imagenet_templates())
        caption = clip.encode_text([r["caption"]])
        assert r["blip_similarity"] == pytest.approx(
            float(cosine(caption, prompt[None])[0]), abs=1e-5
        )


def test_owlv2_detection_runs_with_the_prompt_sets_vocabulary(tiny_owlv2):
    from sepen.evaluators.detection import Detector

    detector = Detector("owlv2", tiny_owlv2, "cpu", threshold=0.0, batch_size=2)
    images = _images()
    vocab = [["cat", "dog", "bowl"]] * 3
    found = detector.detect(images, vocab)
    assert len(found) == 3 and all(lab in vocab[0] for boxes in found for lab, _ in boxes)
    assert all(boxes for boxes in found)  # threshold 0: every box is kept
    rows = detector(images, PROMPTS, vocab)
    for boxes, row in zip(found, rows):
        assert row == detection_outcome(boxes, ["cat", "dog"], 0.0)
    high = Detector("owlv2", tiny_owlv2, "cpu", threshold=1.0)(images, PROMPTS, vocab)
    assert all(r["detection_success"] == 0.0 for r in high)


def test_missing_metric_models_are_named_before_any_work(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from sepen.config import load_config
    from sepen.evaluators import preflight

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    config = load_config(None, ["evaluation.metrics=[clip]"])  # ViT-B-16/openai, not cached here
    with pytest.raises(ModelNotAvailableError, match="ViT-B-16/openai.*HF_HOME"):
        preflight(config)
    missing = str(tmp_path / "nope")
    config = load_config(
        None,
        ["evaluation.metrics=[detection]", f"evaluation.detection.model={missing}/owl"],
    )
    with pytest.raises(ModelNotAvailableError, match="evaluation.detection.model"):
        preflight(config)


def test_frechet_distance_of_known_gaussians():
    from sepen.evaluators.fid import fid, frechet_distance

    # |mu|^2 = 2, Tr(I + 4I - 2 (4I)^(1/2)) = 2 + 8 - 8 = 2
    assert frechet_distance([0, 0], np.eye(2), [1, 1], 4 * np.eye(2)) == pytest.approx(4.0)
    x = np.random.default_rng(0).normal(size=(500, 3))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)
    assert fid(x, x + 2) == pytest.approx(12.0, rel=1e-6)


def _write_images(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, im in enumerate(_images(n, 40) if seed == 0 else _images(n + 3, 40)[3:]):
        paths.append(folder / f"{k}.png")
        im.save(paths[-1])
    return paths


@pytest.mark.slow
def test_metrics_and_fid_commands_end_to_end_on_tiny_models(
    tmp_path, tiny_clip, tiny_blip, tiny_owlv2
):
    import yaml

    from sepen.__main__ import main

    plan = {
        "format": "sepen-plan-1",
        "seeds": [0, 1],
        "sets": {"animals": ["p0", "p1"]},
        "order": ["p0", "p1"],
        "prompts": {
            "p0": {"prompt": "a cat and a dog", "concepts": ["cat", "dog"], "model": None},
            "p1": {"prompt": "a dog with a bowl", "concepts": ["dog", "bowl"], "model": None},
        },
        "models": {},
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    paths = _write_images(tmp_path / "images", 4, 0)
    items = [(p, s) for p in ("p0", "p1") for s in (0, 1)]
    manifest = {
        "method": "base",
        "shard": 0,
        "shards": 1,
        "images": [
            {"prompt_id": p, "seed": s, "path": str(path)} for (p, s), path in zip(items, paths)
        ],
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    _write_images(tmp_path / "reference", 5, 1)
    config = {
        "evaluation": {
            "metrics": ["clip", "blip", "detection"],
            "clip": {"model": tiny_clip, "pretrained": None},
            "blip": {"model": tiny_blip, "max_new_tokens": 4},
            "detection": {"model": tiny_owlv2, "threshold": 0.0},
            "fid": {"reference": str(tmp_path / "reference"), "weights": None, "batch_size": 3},
        }
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    common = ["--config", str(tmp_path / "c.yaml")]
    args = ["--plan", str(tmp_path / "plan.json"), "--manifest", str(tmp_path / "m.json")]
    assert main(["metrics", *common, *args, "--out", str(tmp_path / "s.json")]) == 0
    shard = json.loads((tmp_path / "s.json").read_text())
    assert shard["models"]["detection"].startswith("owlv2:")
    keys = {"clip_full", "clip_min_object", "blip_similarity", "detection_success"}
    assert all(keys <= set(r) for r in shard["rows"]) and len(shard["rows"]) == 4
    fid_args = ["--manifests", str(tmp_path / "m.json"), "--out", str(tmp_path / "fid.json")]
    assert main(["fid", *common, *fid_args]) == 0
    fid = json.loads((tmp_path / "fid.json").read_text())
    assert fid["n_images"] == 4 and fid["n_reference"] == 5 and fid["fid"] >= 0
    agg = ["--plan", str(tmp_path / "plan.json"), "--metrics", str(tmp_path / "s.json")]
    out = ["--fid", str(tmp_path / "fid.json"), "--out", str(tmp_path / "r.json")]
    assert main(["aggregate", *common, *agg, *out]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["fid"]["base"]["fid"] == fid["fid"]
    mean = np.mean([r["clip_full"] for r in shard["rows"]])
    assert result["sets"]["overall"]["base"]["clip_full"]["mean"] == pytest.approx(mean)


def test_inception_weights_missing_offline_is_named(tmp_path, monkeypatch):
    from sepen.evaluators.fid import InceptionFeatures

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="inception_v3_google.*cannot be downloaded"):
        InceptionFeatures("IMAGENET1K_V1", "cpu")
