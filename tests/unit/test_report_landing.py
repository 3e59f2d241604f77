"""The report leads with the answer: the headline on the landing text and the metrics page,
success first and then the failure kinds."""

from sepen.report.tables import (
    card_rows,
    headline,
    landing_text,
    ordered_metrics,
    table_page,
)


def ci(mean, lo, hi, n=160):
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def result():
    metrics = sorted(
        ["success", "hit_rate", "spurious", "exact_count"]
        + [f"fail_{k}" for k in ("missing", "too_small", "merged", "wrong_shape", "spurious")]
    )

    def entry(s):
        return {m: ci(s if m == "success" else 0.1, 0.0, 1.0) for m in metrics}

    return {
        "methods": ["base", "sepen", "attend_excite"],
        "metrics": metrics,
        "sets": {
            "single": {"base": entry(1.0), "sepen": entry(0.99)},
            "held_out_pairs": {
                "base": entry(0.25),
                "sepen": entry(0.45),
                "attend_excite": entry(0.4),
            },
            "overall": {"base": entry(0.6), "sepen": entry(0.7)},
        },
        "differences": {
            "single": {"sepen": {m: ci(-0.01, -0.03, 0.0) for m in metrics}},
            "held_out_pairs": {
                "sepen": {m: ci(0.2, 0.12, 0.28) for m in metrics},
                "attend_excite": {m: ci(0.15, 0.08, 0.22) for m in metrics},
            },
        },
    }


def test_metrics_are_ordered_success_then_failure_kinds_then_the_rest():
    order = ordered_metrics(result()["metrics"])
    assert order[:6] == [
        "success",
        "fail_missing",
        "fail_too_small",
        "fail_merged",
        "fail_wrong_shape",
        "fail_spurious",
    ]
    assert sorted(order[6:]) == ["exact_count", "hit_rate", "spurious"]
    assert ordered_metrics(["clip_score", "blip"]) == ["clip_score", "blip"]


def test_headline_states_base_sepen_and_attend_excite_with_paired_cis():
    lines = headline(result())
    held = next(line for line in lines if line.startswith("held_out_pairs"))
    assert held == (
        "held_out_pairs (160 images), success: base 0.250 [0.000, 1.000] -> "
        "sepen 0.450 [0.000, 1.000] (paired +0.200 [+0.120, +0.280]) -> "
        "attend_excite 0.400 [0.000, 1.000] (paired +0.150 [+0.080, +0.220])"
    )
    assert any(line.startswith("single (160 images), success: base 1.000") for line in lines)
    assert not any(line.startswith("overall") for line in lines)


def test_metrics_page_opens_with_the_answer_and_success_before_exact_count():
    page = table_page(result(), None, None)
    assert page.index("The answer") < page.index("<h3>success")
    assert page.index("<h3>success") < page.index("<h3>fail_missing")
    assert page.index("<h3>fail_spurious") < page.index("<h3>exact_count")
    assert "paired +0.200 [+0.120, +0.280]" in page


def test_landing_text_is_restructured_text_with_the_headline_and_the_card():
    card = {
        "seeds": [50000, 50015],
        "success": {"held_out_pairs": ci(0.3, 0.2, 0.4)},
        "attend_excite": {"chosen_scale": 10.0},
        "criteria": {"held_out_pairs_at_most": {"value": 0.3, "holds": True}},
    }
    text = landing_text(result(), card, "Workflow **{{ snakemake.config['experiment'] }}**.")
    lines = text.splitlines()
    assert lines[:2] == ["The answer", "=========="]
    assert lines[3].startswith("- single") and lines[4].startswith("- held_out_pairs")
    assert "card seeds 50000-50015" in text and "step size 10 chosen" in text
    assert card_rows(card) == [
        ["criterion", "value", "holds"],
        ["held out pairs at most", "0.300", "yes"],
    ]
    from docutils.core import publish_parts

    html = publish_parts(text, writer="html")["html_body"]
    assert "The answer" in html and "paired +0.200" in html
    assert text.index("paired +0.200") < text.index("What was run") < text.index("Workflow")
