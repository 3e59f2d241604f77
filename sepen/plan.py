"""Concept lists and the evaluation plan: prompt sets, seeds, finetuned models, shards.

Pure functions of the config and the data files, so that `sepen concepts`/`sepen prompts` write
them as artifacts and the Snakefile computes the same jobs from them at DAG-construction time.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from sepen.artifacts import read_json
from sepen.config import read_yaml
from sepen.errors import ConfigError, SepenError
from sepen.toy.world import prepare_world, prompt_for

PLAN_FORMAT = "sepen-plan-1"
log = logging.getLogger("sepen.plan")


def slugify(text: str, max_chars: int = 60) -> str:
    """A file-name-safe, collision-free name for a prompt or concept tuple.

    Lower-case letters, digits and '-' from the text (at most `max_chars`), then '_' and the
    first 8 hex digits of the text's SHA-1, so that texts differing only in case, punctuation or
    beyond the cut still get different names.
    """
    readable = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_chars].strip("-")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{readable or 'x'}_{digest}"


def find_concepts(prompt: str, vocabulary: list[str]) -> list[str]:
    """Concepts of `vocabulary` named in `prompt` (whole words), in order of appearance.

    Longer names claim text first ("wine glass" before "glass").
    """
    taken: list[tuple[int, int, str]] = []
    for name in sorted(set(vocabulary), key=len, reverse=True):
        pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", re.IGNORECASE)
        for m in pattern.finditer(prompt):
            if all(m.end() <= a or m.start() >= b for a, b, _ in taken):
                taken.append((m.start(), m.end(), name))
    return [name for _, _, name in sorted(taken)]


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"data file {path!r} does not exist: copy it from the project's data/ folder "
            f"or point the config (evaluation.prompt_file / concept_file) at it"
        )
    return p.read_text()


def _read_data(path: str) -> dict:
    return read_yaml(_read_text(path)) or {}


CUSTOM_SET = "custom"


def _custom_entry(item, vocabulary: list[str], where: str) -> tuple[str, list[str]]:
    """(prompt, concepts) of one custom entry: a prompt string (concepts found from the
    vocabulary) or {prompt, concepts}."""
    if isinstance(item, str):
        prompt, named = item, None
    elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
        prompt, named = item["prompt"], item.get("concepts")
    else:
        raise ConfigError(
            f"{where}: {item!r} is neither a prompt nor {{prompt: ..., concepts: [...]}}: "
            f"write each entry as one of those"
        )
    if named is None:
        named = find_concepts(prompt, vocabulary)
    elif not isinstance(named, list) or not all(isinstance(c, str) and c for c in named):
        raise ConfigError(f"{where}: the concepts of {prompt!r} must be a list of names")
    missing = [c for c in named if not find_concepts(prompt, [c])]
    if missing:
        raise ConfigError(
            f"{where}: concept {missing[0]!r} is not a whole word of prompt {prompt!r}: "
            f"name each concept as it is written in the prompt"
        )
    if not named:
        raise ConfigError(
            f"{where}: prompt {prompt!r} names no concept"
            + (f" of the vocabulary {vocabulary}" if vocabulary else "")
            + ": give its concepts ({prompt: ..., concepts: [...]}) or add them to the vocabulary"
        )
    return prompt, list(named)


def read_custom_prompts(path: str) -> dict[str, list[tuple[str, list[str]]]]:
    """Prompt sets of a custom prompt file, each prompt with its concepts.

    YAML: `prompts:` a list (one set, 'custom') or a mapping of set names to lists; each entry
    a prompt (its concepts found among `vocabulary:`) or {prompt, concepts}. CSV: columns
    `prompt`, `concepts` (names separated by ';', or empty to find them in the vocabulary of
    a `vocabulary` column's first non-empty value) and an optional `set`.
    """
    text = _read_text(path)
    if str(path).lower().endswith(".csv"):
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "prompt" not in rows[0]:
            raise ConfigError(
                f"{path!r} has no 'prompt' column: give a CSV with columns prompt, concepts "
                f"(names separated by ';') and optionally set"
            )
        vocab_cell = next((r.get("vocabulary") for r in rows if r.get("vocabulary")), "")
        vocabulary = [c.strip() for c in (vocab_cell or "").split(";") if c.strip()]
        raw: dict[str, list] = {}
        for r in rows:
            names = [c.strip() for c in (r.get("concepts") or "").split(";") if c.strip()]
            entry = {"prompt": r["prompt"], "concepts": names} if names else r["prompt"]
            raw.setdefault((r.get("set") or CUSTOM_SET).strip(), []).append(entry)
    else:
        data = read_yaml(text) or {}
        if not isinstance(data, dict) or "prompts" not in data:
            raise ConfigError(
                f"{path!r} has no 'prompts:' list: give a YAML with prompts (and optionally a "
                f"vocabulary), e.g. prompts: [{{prompt: a cat and a hat, concepts: [cat, hat]}}]"
            )
        vocabulary = list(data.get("vocabulary") or [])
        raw = (
            data["prompts"] if isinstance(data["prompts"], dict) else {CUSTOM_SET: data["prompts"]}
        )
    sets = {}
    for name, items in raw.items():
        if not isinstance(items, list) or not items:
            raise ConfigError(
                f"{path!r}: prompt set {name!r} is empty or not a list: give it a list of prompts"
            )
        sets[str(name)] = [
            _custom_entry(item, vocabulary, f"{path!r}, set {name!r}") for item in items
        ]
    return sets


def concept_lists(config: dict) -> dict:
    """The experiment's concepts: {'source', 'concepts', 'splits': {'seen', 'unseen'}, ...}.

    'seen' concepts are those finetuning may use (joint mode); 'unseen' ones are held out.
    The toy world adds its trained and held-out pairs.
    """
    ev = config["evaluation"]
    source = ev["prompts"]
    if source == "toy":
        toy = prepare_world(config)
        concepts = list(toy["concepts"])
        return {
            "source": source,
            "concepts": concepts,
            "splits": {"seen": concepts, "unseen": []},
            "pairs": {"trained": toy.trained_pairs, "held_out": toy.held_out_pairs},
        }
    if source == "custom":
        sets = read_custom_prompts(ev["prompt_file"])
        concepts = list(dict.fromkeys(c for items in sets.values() for _, n in items for c in n))
        return {"source": source, "concepts": concepts, "splits": {"seen": concepts, "unseen": []}}
    if source == "attend_excite":
        data = _read_data(ev["prompt_file"])
        vocab = data.get("vocabulary") or {}
        if not vocab.get("animals") and not vocab.get("objects"):
            raise ConfigError(
                f"{ev['prompt_file']!r} has no vocabulary.animals/objects lists: give the "
                f"Attend-and-Excite prompt file (data/attend_excite_prompts.yaml)"
            )
        concepts = list(vocab.get("animals", [])) + list(vocab.get("objects", []))
        return {"source": source, "concepts": concepts, "splits": {"seen": concepts, "unseen": []}}
    data = _read_data(ev["concept_file"])
    seen = [c for k, v in data.items() if k.endswith("_train") for c in v]
    unseen = [c for k, v in data.items() if k.endswith("_test") for c in v]
    if not seen:
        raise ConfigError(
            f"{ev['concept_file']!r} has no '*_train' concept lists: give the large-scale "
            f"concept file (data/large_scale_concepts.yaml)"
        )
    return {"source": source, "concepts": seen + unseen, "splits": {"seen": seen, "unseen": unseen}}


def _prompt_sets(config: dict, concepts: dict) -> dict[str, list[tuple[str, list[str]]]]:
    ev = config["evaluation"]
    source = concepts["source"]
    if source == "toy":
        return {
            "single": [(prompt_for([c]), [c]) for c in concepts["concepts"]],
            "trained_pairs": [(prompt_for(p), list(p)) for p in concepts["pairs"]["trained"]],
            "held_out_pairs": [(prompt_for(p), list(p)) for p in concepts["pairs"]["held_out"]],
        }
    if source == "custom":
        return read_custom_prompts(ev["prompt_file"])
    if source == "attend_excite":
        raw = _read_data(ev["prompt_file"]).get("prompts") or {}
        sets = {
            name: [(p, find_concepts(p, concepts["concepts"])) for p in ps]
            for name, ps in raw.items()
        }
    else:
        lines = str(_read_text(ev["prompt_file"])).splitlines()
        seen = set(concepts["splits"]["seen"])
        sets = {"seen_seen": [], "seen_unseen": [], "unseen_unseen": []}
        for line in (x.strip() for x in lines):
            if not line:
                continue
            named = find_concepts(line, concepts["concepts"])
            n_seen = sum(c in seen for c in named)
            key = ["unseen_unseen", "seen_unseen", "seen_seen"][min(n_seen, 2)]
            sets[key].append((line, named))
        sets = {k: v for k, v in sets.items() if v} or {"seen_seen": []}  # kinds it has
    if not sets:
        raise ConfigError(f"{ev['prompt_file']!r} has no prompt sets: give it prompts")
    for name, items in sets.items():
        if not items:
            raise ConfigError(
                f"prompt set {name!r} of {ev['prompt_file']!r} is empty: give it prompts "
                f"or leave it out of the file"
            )
        for prompt, named in items:
            if len(named) < 2:
                raise ConfigError(
                    f"prompt {prompt!r} of set {name!r} names {named} - fewer than two known "
                    f"concepts: fix the prompt or add its concepts to the concept lists"
                )
    return sets


MODEL_SINGLES = "model_singles"


def model_singles(prompts: dict, models: dict, template: str) -> list[str]:
    """Each per-pair model on each of its concepts alone ('a photo of a {c}', the norm loss's
    template): does the fix for a pair still draw its objects one at a time? Adds the prompts
    (id: the prompt and its model) and returns their ids."""
    ids = []
    for model, entry in models.items():
        for concept in dict.fromkeys(entry["concepts"]):
            prompt = template.format(concept)
            pid = slugify(f"{prompt} | {model}")
            prompts[pid] = {"prompt": prompt, "concepts": [concept], "model": model}
            ids.append(pid)
    return ids


def build_plan(config: dict, concepts: dict | None = None) -> dict:
    """Prompt sets, seeds and models of an experiment.

    Returns {'format', 'experiment', 'seeds', 'sets': {set: [prompt id]}, 'prompts': {id:
    {'prompt', 'concepts', 'model'}}, 'models': {model id: {'concepts': [...]}}, 'order': [ids]}.
    In pairs mode every distinct concept tuple of the multi-object prompts gets its own model
    (with evaluation.model_singles, a set 'model_singles' draws each model's concepts alone);
    in joint mode one model 'joint' is trained on the seen concepts.
    """
    concepts = concepts or concept_lists(config)
    ev, ft = config["evaluation"], config["finetune"]
    sets = _prompt_sets(config, concepts)
    if ev["sets"]:
        unknown = sorted(set(ev["sets"]) - set(sets))
        if unknown:
            raise ConfigError(
                f"evaluation.sets names unknown prompt sets {unknown}; "
                f"this source has {sorted(sets)}"
            )
        sets = {k: v for k, v in sets.items() if k in ev["sets"]}
    unknown = sorted(set(ev["attend_excite"]["sets"]) - set(sets))
    if unknown and set(MULTI_OBJECT_METHODS) & set(ev["methods"]):  # (read only by those)
        raise ConfigError(
            f"evaluation.attend_excite.sets names {unknown}, not among the evaluated prompt "
            f"sets {sorted(sets)}: name evaluated sets (or [] for every multi-object set)"
        )
    prompts: dict[str, dict] = {}
    models: dict[str, dict] = {}
    if ft["mode"] == "joint":
        models["joint"] = {"concepts": list(concepts["splits"]["seen"])}
    set_ids: dict[str, list[str]] = {}
    for name, items in sets.items():
        ids = []
        for prompt, named in items:
            pid = slugify(prompt)
            if pid not in prompts:
                model = None
                if len(named) >= 2:
                    if ft["mode"] == "joint":
                        model = "joint"
                    else:
                        model = slugify("+".join(named))
                        entry = models.setdefault(model, {"concepts": list(named)})
                        if concepts["source"] == "custom":  # trained on its own prompts
                            entry.setdefault("prompts", []).append(prompt)
                elif ft["mode"] == "joint":
                    model = "joint"
                prompts[pid] = {"prompt": prompt, "concepts": list(named), "model": model}
            ids.append(pid)
        set_ids[name] = ids
    if ev["model_singles"] and ft["mode"] == "pairs":
        set_ids[MODEL_SINGLES] = model_singles(prompts, models, ft["single_template"])
    order = list(dict.fromkeys(pid for ids in set_ids.values() for pid in ids))
    start = ev["seed"]
    return {
        "format": PLAN_FORMAT,
        "experiment": config["experiment"],
        "seeds": list(range(start, start + ev["images_per_prompt"])),
        "sets": set_ids,
        "prompts": prompts,
        "models": models,
        "order": order,
    }


# The test-time methods sample only the prompts that name several objects: their latent updates
# balance the objects' attention, which a one-object prompt does not need (and they cost more).
MULTI_OBJECT_METHODS = ("attend_excite", "sepen_test_time")
# the finetune keys whose losses SepEn at test time uses (sepen.test_time.GuidanceMethod)
TEST_TIME_FINETUNE_KEYS = (
    "lambda_sep",
    "lambda_en",
    "token_aggregation",
    "enhance_kernel",
    "resolutions",
    "blocks",
    "joint_maps",
)


def method_prompts(plan: dict, method: str | None = None, sets=()) -> list[str]:
    """Prompt ids a method samples, in the plan's order.

    The test-time methods sample the multi-object prompts only, and with `sets` given
    (evaluation.attend_excite.sets) only those of these prompt sets.
    """
    if method not in MULTI_OBJECT_METHODS:
        return list(plan["order"])
    chosen = {p for name in sets for p in plan["sets"].get(name, [])} if sets else None
    return [
        p
        for p in plan["order"]
        if len(plan["prompts"][p]["concepts"]) > 1 and (chosen is None or p in chosen)
    ]


def shard_prompts(
    plan: dict, shard: int, shards: int, method: str | None = None, sets=()
) -> list[str]:
    """Prompt ids of one shard: round-robin over the prompts the method samples."""
    if not 0 <= shard < shards:
        raise SepenError(f"shard {shard} is outside 0..{shards - 1}: give --shard below --shards")
    return method_prompts(plan, method, sets)[shard::shards]


def attention_prompts(plan: dict, n: int) -> list[str]:
    """Up to n multi-object prompts for the attention figure, taking each prompt set in turn."""
    by_set = [
        [p for p in ids if len(plan["prompts"][p]["concepts"]) > 1] for ids in plan["sets"].values()
    ]
    picked: list[str] = []
    for k in range(max((len(ids) for ids in by_set), default=0)):
        for ids in by_set:
            if k < len(ids) and ids[k] not in picked and len(picked) < n:
                picked.append(ids[k])
    return picked


def read_plan(path: str | Path) -> dict:

    plan = read_json(path, "plan file", "sepen prompts", ("format",))
    if plan.get("format") != PLAN_FORMAT:
        raise SepenError(f"{str(path)!r} is not a sepen prompt plan (format {PLAN_FORMAT})")
    return plan
