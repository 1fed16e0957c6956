"""The report's figures stay readable: long stage ids, reasons named once."""
from __future__ import annotations


def test_funnel_labels_of_long_stage_ids_do_not_overlap_and_reasons_name_the_stage_once():
    from curate.report.html import _plt, funnel_figure, reason_label

    rows = [{"stage": sid, "n_in": 100, "n_kept": 80} for sid in
            ("index", "text_english_only", "image_quality_strict", "clip_score_vit_l14", "clip_rank_top30", "dedup")]
    fig = funnel_figure(rows)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in ax.get_yticklabels()][::-1] == [r["stage"] for r in rows]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(b.x0 >= 0 for b in boxes)  # inside the figure
    _plt().close(fig)
    assert reason_label("image", "image:aspect") == "image:aspect"
    assert reason_label("img2", "image:aspect") == "img2: image:aspect"
    assert reason_label("text", "lang:de") == "text: lang:de"
