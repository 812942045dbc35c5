"""The HTML validation report: sections, embedded figures, missing values, escaping, size."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
from PIL import Image

from xbmd.evaluation.numbers import TooFewValuesError, fmt_number, fmt_p
from xbmd.evaluation.plots import (
    bland_altman_plot,
    bmd_at_t_thresholds,
    pose_spread_plot,
    scatter_plot,
)
from xbmd.evaluation.report import GALLERY_MAX_PNG_BYTES, write_report

#: NHANES III young white women, total hip (g/cm2): T = (BMD - 0.942) / 0.122.
T_MEAN, T_SD = 0.942, 0.122
SECTIONS = (
    "xbmd validation report",
    "Headline: end to end and on true crops",
    "End to end",
    "Reproducibility by session",
    "Robustness of the delivered file",
    "Interval",
    "Quality gate",
    "Agreement",
    "Diagnostic performance",
    "Decomposition",
    "Reproducibility over poses",
    "Robustness",
    "Site calibration",
    "Gallery",
)
COMMAND = 'xbmd evaluate --model m.pt --data "a&b" <cohort>'
NASTY_ID = 'p1<img src="http://evil">&'


def make_table(n_patients: int = 3, poses: int = 2, seed: int = 0) -> list[dict]:
    """One row per image: patients x 2 sides x poses, estimate = reference + noise (g/cm2)."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        for side in ("left", "right"):
            reference = float(rng.uniform(0.55, 1.1))
            for pose in range(poses):
                estimate = reference + float(rng.normal(0.01, 0.04))
                rows.append(
                    {
                        "sample_id": f"p{patient}_{side}_{pose}",
                        "patient_id": f"p{patient}",
                        "side": side,
                        "hip": f"p{patient}/{side}",
                        "estimate": estimate,
                        "reference": reference,
                        "estimate_t": (estimate - T_MEAN) / T_SD,
                        "reference_t": (reference - T_MEAN) / T_SD,
                        "ignored_extra": "x",
                    }
                )
    return rows


def make_metrics() -> dict:
    metrics = _make_metrics()
    metrics["end_to_end"]["diagnostic"] = copy.deepcopy(metrics["diagnostic"])
    metrics["site_calibration"] = {
        "method": "passing-bablok", "slope": 1.04, "intercept": -0.02, "slope_ci": [0.97, 1.12],
        "intercept_ci": [-0.08, 0.04], "n_hips": 44, "residual_sd_g_cm2": 0.061,
        "dxa_scale": "hologic", "file": "site_calibration.json", "warnings": [],
    }  # fmt: skip
    return metrics


def _make_metrics() -> dict:
    stats = {"groups": 6, "rms_cv_pct": 3.456, "rms_sd": 0.0271, "lsc": 0.0751, "unit": "g/cm2"}
    return {
        "xbmd_version": "0.1.0",
        "created_utc": "2025-01-02T03:04:05Z",
        "command": COMMAND,
        "source": {"model": "m.pt", "dataset": "cohort", "predictions_csv": None},
        "target": {
            "estimate": "bmd_g_cm2",
            "reference": "ct_abmd_g_cm2",
            "unit": "g/cm2",
            "label": "DXA-like CT aBMD",
        },
        "counts": {"images": 12, "hips": 6, "patients": 3},
        "settings": {"icc": "ICC(2,1) two-way random, absolute agreement, single"},
        "agreement": [
            {
                "estimate": "bmd_g_cm2",
                "reference": "ct_abmd_g_cm2",
                "unit": "g/cm2",
                "level": level,
                "n": n,
                "pearson_r": 0.91234,
                "pearson_ci95": [0.71, 0.975],
                "pearson_p": 3.2e-5,
                "icc_a1": 0.8876,
                "mae": 0.04321,
                "mae_pct": 5.432,
                "rmse": 0.0512,
                "bias": 0.0123,
                "limits_of_agreement": [-0.0871, 0.1117],
            }
            for level, n in (("image", 12), ("hip", 6))
        ],
        "diagnostic": {
            "reference": "ct_abmd_g_cm2",
            "t_score_reference": "NHANES III white women 20-29, total hip 0.942 +/- 0.122 g/cm2",
            "tasks": [
                {
                    "name": "osteoporosis",
                    "definition": "T <= -2.5",
                    "n": 12,
                    "n_positive": 3,
                    "auc": 0.9259,
                    "sensitivity": 0.6667,
                    "specificity": 0.8889,
                    "confusion": {"tp": 2, "fp": 1, "tn": 8, "fn": 1},
                },
                {
                    "name": "low bone mass",
                    "definition": "T < -1",
                    "n": 12,
                    "n_positive": 7,
                    "auc": float("nan"),
                    "sensitivity": 1.0,
                    "specificity": 0.6,
                    "confusion": {"tp": 7, "fp": 2, "tn": 3, "fn": 0},
                },
            ],
            "who": {
                "labels": ["normal", "osteopenia", "osteoporosis"],
                "matrix": [[3, 2, 0], [0, 3, 1], [0, 1, 2]],
            },
        },
        "decomposition": {
            "n": 12,
            "psnr_db": {"mean": 31.234, "median": 30.9},
            "ssim": {"mean": 0.8766, "median": 0.88},
            "gradient_correlation": {"mean": 0.77, "median": 0.78},
            "pf_abmd": {
                "bias_g_cm2": 0.004,
                "mean_abs_error_g_cm2": 0.021,
                "mean_abs_error_pct": 2.5,
                "median_abs_error_pct": 2.1,
            },
        },
        "reproducibility": {
            "estimates": {"bmd_g_cm2": stats},
            "reference_itself": {},
            "published_rms_cv_pct": [3.27, 3.79],
            "dxa_total_hip_precision_pct": [1.0, 2.0],
        },
        "robustness": {
            "estimate": "bmd_g_cm2",
            "rows": [
                {
                    "kind": kind,
                    "level": level,
                    "label": f"{kind} {level:g}",
                    "n": 12,
                    "mean_abs_change_pct": change,
                    "p95_abs_change_pct": 2 * change,
                    "mean_change_pct": -change / 2,
                }
                for kind, level, change in (
                    ("jpeg", 90, 0.2),
                    ("jpeg", 70, 0.4),
                    ("jpeg", 50, 0.8),
                    ("jpeg", 30, 1.6),
                    ("exposure", 0.5, 1.1),
                    ("exposure", 2.0, 0.9),
                    ("gamma", 0.8, 0.5),
                    ("gamma", 1.25, 0.6),
                    ("noise", 0.01, 0.3),
                    ("noise", 0.05, 1.4),
                )
            ],
            "jpeg_target": {"max_mean_abs_change_pct": 1.0, "min_quality": 50, "met": True},
        },
        "runtime_s": {"predict": 12.5, "total": 150.0},
        **make_user_sections(),
    }


def make_user_sections() -> dict:
    """The end-to-end sections of metrics.json: headline, end_to_end, sessions, whole-file
    robustness, interval and gate (the shapes ``xbmd evaluate`` writes)."""
    agree = {
        "n": 11,
        "pearson_r": 0.8123,
        "pearson_ci95": [0.41, 0.95],
        "icc_a1": 0.7789,
        "mae": 0.0612,
        "mae_pct": 7.65,
        "bias": -0.0111,
    }
    precision = {"groups": 5, "rms_cv_pct": 2.345, "rms_sd": 0.0199, "lsc": 0.0551}
    file_rows = [
        {
            "kind": kind,
            "level": level,
            "label": f"{kind} {level:g}",
            "reference": "8-bit PNG" if kind == "jpeg" else "original file",
            "n": 10,
            "not_reported": 0,
            "mean_abs_change_pct": change,
            "p95_abs_change_pct": 3 * change,
            "max_abs_change_pct": 4 * change,
            "mean_change_pct": change,
            "share_not_confident": 0.0,
            "reference_confident": 10,
            "turned_not_confident": 1 if level == 50 else 0,
            "category_changed": 0,
            **({"target_met": change <= 0.5} if kind == "jpeg" else {}),
        }
        for kind, level, change in (
            ("png8", 8, 0.05),
            ("jpeg", 95, 0.3),
            ("jpeg", 50, 1.7),
            ("spacing", -10, 4.0),
            ("spacing", 10, 3.0),
        )
    ]
    return {
        "headline": {
            "estimate": "bmd_g_cm2",
            "reference": "ct_abmd_g_cm2",
            "rows": [
                {"mode": "end_to_end", "level": "image", "expected": 12, "failures": 1, **agree},
                {
                    "mode": "true_crops",
                    "level": "image",
                    "expected": 12,
                    "failures": 0,
                    **agree,
                    "n": 12,
                    "pearson_r": 0.9012,
                },
            ],
        },
        "end_to_end": {
            "radiographs_root": "cohort",
            "counts": {
                "radiographs": 6,
                "hips_expected": 12,
                "hips_reported": 11,
                "implant_hips": 0,
                "failed": 1,
                "unmatched": 1,
            },
            "agreement": [
                {
                    "estimate": "bmd_g_cm2",
                    "reference": "ct_abmd_g_cm2",
                    "unit": "g/cm2",
                    "level": "image",
                    **agree,
                }
            ],
            "diagnostic": None,
            "localisation": {
                "n": 11,
                "median_mm": 2.1,
                "p95_mm": 5.5,
                "max_mm": 12.5,
                "flag_mm": 10.0,
                "beyond_flag": 1,
            },
            "failures": [
                {
                    "sample_id": "p1/x_right",
                    "xray": "p1/x.dcm",
                    "side": "right",
                    "implant": "",
                    "stage": "estimate",
                    "error": "no femoral head found <here>",
                }
            ],
            "unmatched": [
                {"xray": "p2/x.dcm", "side": "left", "bmd_g_cm2": 0.7712, "reason": "no row"}
            ],
        },
        "sessions": {
            "estimate": "bmd_g_cm2",
            "unit": "g/cm2",
            "modes": {
                "end_to_end": {
                    "images": 12,
                    "images_without_study": 0,
                    "hips": 6,
                    "sessions": 12,
                    "same_session": {**precision, "target_rms_cv_pct": 2.0, "met": False},
                    "cross_device": {
                        **precision,
                        "rms_cv_pct": 3.21,
                        "target_rms_cv_pct": 4.0,
                        "met": True,
                    },
                    "all_images": precision,
                }
            },
            "published_rms_cv_pct": [3.27, 3.79],
            "dxa_total_hip_precision_pct": [1.0, 2.0],
        },
        "whole_file_robustness": {
            "estimate": "bmd_g_cm2",
            "radiographs": 5,
            "radiographs_available": 6,
            "hips": 10,
            "rows": file_rows,
            "jpeg_target": {
                "max_mean_abs_change_pct": 0.5,
                "max_p95_abs_change_pct": 1.5,
                "min_quality": 50,
                "met": False,
            },
        },
        "interval": {
            "reference": "ct_abmd_g_cm2",
            "hips": 11,
            "with_interval": 11,
            "compared": 11,
            "coverage": 0.9091,
            "below": 0.0,
            "above": 0.0909,
            "median_width_g_cm2": 0.2345,
            "mean_width_g_cm2": 0.24,
            "median_width_t": 1.92,
            "confident_compared": 10,
            "confident_coverage": 0.9,
            "target_coverage": [0.93, 0.97],
            "met": False,
        },
        "gate": {
            "implant": {
                "hips": 2,
                "reported": 2,
                "flagged": 1,
                "refused": 0,
                "share_flagged_or_refused": 0.5,
                "target": 1.0,
                "met": False,
            },
            "clean": {
                "hips": 11,
                "reported": 11,
                "refused": 0,
                "flagged": 0,
                "share_flagged": 0.0,
                "target_max": 0.02,
                "met": True,
            },
            "ood": {
                "hips_scored": 13,
                "above_threshold": 1,
                "share_above": 0.0769,
                "clean": {"hips_scored": 11, "share_above": 0.0},
                "implant": {"hips_scored": 2, "share_above": 0.5},
            },
            "reasons": [
                {"reason": "implant in the hip", "hips": 1, "example": "implant in the hip"}
            ],
            "not_confident_without_reason": 0,
            "by_manufacturer": [
                {"manufacturer": "Tern", "hips": 11, "share_flagged": 0.0, "share_ood": 0.0}
            ],
        },
    }


def make_gallery(side_px: int = 64) -> list[dict]:
    rows, cols = np.mgrid[0:side_px, 0:side_px] / side_px
    reference = 1.2 * np.exp(-((rows - 0.5) ** 2 + (cols - 0.5) ** 2) * 8)
    items = []
    for label, scale, sample_id in (
        ("best", 1.01, "p0_left_0"),
        ("median", 1.05, NASTY_ID),
        ("worst", 0.8, "p2_right_1"),
    ):
        items.append(
            {
                "label": label,
                "sample_id": sample_id,
                "xray": 1000 + 3000 * reference,
                "reference": reference,
                "prediction": scale * reference,
                "region": reference > 0.6 if label != "worst" else None,
                "abs_error_pct": abs(scale - 1) * 100,
            }
        )
    return items


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = write_report(out, make_metrics(), make_table(), make_gallery(), make_table(seed=5))
    return path, path.read_text(encoding="utf-8")


def test_report_has_every_section_and_only_embedded_images(full_report):
    path, page = full_report
    assert path.name == "report.html"
    for heading in SECTIONS:
        assert re.search(rf"<h[12]>{re.escape(heading)}", page), heading
    # 4 true-crop plots + 3 gallery rows + 2 end-to-end plots + the whole-file plot
    assert page.count('src="data:image/png;base64,') == 10
    assert page.index("Headline") < page.index("End to end") < page.index("Part 2: true crops")
    assert 'src="http' not in page and "href=" not in page
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert "not available" not in page


def test_figures_are_valid_pngs(full_report):
    path, _ = full_report
    names = sorted(p.stem for p in (path.parent / "figures").glob("*.png"))
    assert names == [
        "bland_altman",
        "e2e_bland_altman",
        "e2e_scatter",
        "file_robustness",
        "gallery_1_best",
        "gallery_2_median",
        "gallery_3_worst",
        "pose_spread",
        "robustness",
        "scatter",
    ]
    for png in (path.parent / "figures").glob("*.png"):
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
            assert 200 < image.size[0] < 1300 and 200 < image.size[1] < 700


def test_key_numbers_are_formatted_with_units(full_report):
    _, page = full_report
    assert "0.912 [0.710 to 0.975]" in page  # Pearson r and its CI
    assert "3.2e-05" in page  # p-value
    assert "0.043 g/cm2" in page and "5.4 %" in page  # MAE
    assert "-0.087 to 0.112 g/cm2" in page  # limits of agreement
    assert "66.7 %" in page and "92.6" not in page  # sensitivity as %, AUC as a proportion
    assert "0.926" in page
    assert "8 of 12 (66.7 %)" in page  # WHO agreement (trace of the matrix)
    assert "31.23 dB" in page and "0.877" in page
    assert "3.46 %" in page and "3.27 to 3.79 %" in page and "1.00 to 2.00 %" in page
    assert "0.075 g/cm2" in page  # LSC
    assert "<b>met</b>" in page
    assert "<td>50</td>" in page and "<td>1.25</td>" in page  # levels, shortest form
    assert "150.0 s (2.5 min)" in page


def test_end_to_end_sections_show_their_numbers(full_report):
    _, page = full_report
    headline = re.search(r"Headline.*?</table>", page, re.S).group(0)
    assert "0.812 [0.410 to 0.950]" in headline and "0.901" in headline  # both modes
    assert "end to end (whole radiograph" in headline and "true crops (the model" in headline
    assert "no femoral head found &lt;here&gt;" in page  # failures listed, escaped
    assert "Failures: hips not reported (1)" in page and "0.771" in page  # unmatched hip
    assert "median 2.10 mm" in page and "1 beyond 10 mm" in page  # localiser
    sessions = re.search(r"Reproducibility by session.*?</table>", page, re.S).group(0)
    assert "2.35 %" in sessions and "3.21 %" in sessions and "0.055 g/cm2" in sessions
    assert "&le; 2.0 %: <b>missed</b>" in sessions and "&le; 4.0 %: met" in sessions
    delivered = re.search(r"Robustness of the delivered file.*?</table>", page, re.S).group(0)
    assert "1.70 %" in delivered and "5.10 %" in delivered and "1 of 10" in delivered
    assert "90.9 % (target 93.0 % to 97.0 %: <b>missed</b>)" in page  # interval coverage
    assert "0.234 g/cm2" in page and "<td>1.92</td>" in page  # widths
    assert "1 + 0 of 2 = 50.0 %" in page and "0 of 11 = 0.0 %" in page  # gate
    assert "7.7 % of 13" in page  # out-of-distribution share


def test_nan_and_none_print_as_na(full_report):
    _, page = full_report
    row = re.search(r"<td class=\"t\">low bone mass</td>.*?</tr>", page).group(0)
    assert "<td>n/a</td>" in row  # AUC NaN
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", page).lower().replace("nhanes", "")
    assert "nan" not in text
    assert fmt_number(None) == fmt_number(float("nan")) == fmt_p(float("inf")) == "n/a"
    assert fmt_number(0.91234, 3, "g/cm2") == "0.912 g/cm2"


def test_html_special_characters_are_escaped(full_report):
    _, page = full_report
    assert COMMAND not in page
    assert "xbmd evaluate --model m.pt --data &quot;a&amp;b&quot; &lt;cohort&gt;" in page
    assert NASTY_ID not in page and "evil" in page
    assert "p1&lt;img src=&quot;http://evil&quot;&gt;&amp;" in page


def test_missing_sections_say_not_available(tmp_path):
    metrics = make_metrics()
    for key in ("diagnostic", "decomposition", "reproducibility", "robustness", "end_to_end",
                "sessions", "whole_file_robustness", "interval", "gate",
                "site_calibration"):  # fmt: skip
        metrics[key] = None
    del metrics["runtime_s"]
    metrics["agreement"][0]["pearson_r"] = float("nan")
    metrics["agreement"][0]["limits_of_agreement"] = None
    page = write_report(tmp_path, metrics, make_table(), []).read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert heading in page
    assert page.count('class="na">not available: ') == 11  # 10 sections + empty gallery
    assert "n/a [0.710 to 0.975]" in page
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["bland_altman.png", "scatter.png"]


def test_reason_override_and_stale_figures_removed(tmp_path):
    write_report(tmp_path, make_metrics(), make_table(), make_gallery())
    metrics = make_metrics()
    metrics["robustness"] = None
    metrics["not_available"] = {"robustness": "skipped: --no-robustness <given>"}
    page = write_report(tmp_path, metrics, make_table(), []).read_text(encoding="utf-8")
    assert "not available: skipped: --no-robustness &lt;given&gt;" in page
    assert "needs reference T-scores" not in page
    figures = sorted(p.stem for p in (tmp_path / "figures").iterdir())
    assert figures == ["bland_altman", "file_robustness", "pose_spread", "scatter"]


def test_too_few_pairs_skip_the_plots(tmp_path):
    table = make_table()
    for row in table[2:]:
        row["reference"] = None if len(row["hip"]) % 2 else float("nan")
    with pytest.raises(TooFewValuesError, match="2 finite"):
        scatter_plot([r["estimate"] for r in table], [r["reference"] for r in table], "g/cm2")
    with pytest.raises(TooFewValuesError):
        bland_altman_plot([1.0, math.nan, 0.5], [1.0, 0.9, None], "g/cm2")
    page = write_report(tmp_path, make_metrics(), table, []).read_text(encoding="utf-8")
    assert "not available: scatter: 2 finite" in page
    assert not (tmp_path / "figures" / "scatter.png").exists()
    assert (tmp_path / "figures" / "pose_spread.png").exists()  # estimates alone are enough


def test_pose_spread_keeps_hips_with_two_images_sorted_by_mean():
    table = make_table(n_patients=2, poses=2) + [{"hip": "single", "estimate": 0.8}]
    fig = pose_spread_plot(table, "g/cm2")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    means = {h: np.mean([r["estimate"] for r in table if r["hip"] == h]) for h in labels}
    assert len(labels) == 4 and "single" not in labels
    assert list(means.values()) == sorted(means.values())
    with pytest.raises(TooFewValuesError):
        pose_spread_plot([{"hip": "a", "estimate": 1.0}, {"hip": "b", "estimate": 1.0}], "g/cm2")


def test_who_thresholds_in_bmd_from_the_t_scores():
    thresholds = bmd_at_t_thresholds(make_table())
    assert thresholds["T = -1"] == pytest.approx(T_MEAN - T_SD)
    assert thresholds["T = -2.5"] == pytest.approx(T_MEAN - 2.5 * T_SD)
    inconsistent = copy.deepcopy(make_table())
    inconsistent[0]["estimate_t"] += 0.5
    assert bmd_at_t_thresholds(inconsistent) is None
    assert bmd_at_t_thresholds([{"estimate": 1.0}]) is None


def test_report_of_200_images_stays_small(tmp_path):
    table = make_table(n_patients=50, poses=2, seed=1)  # 200 images, 100 hips
    assert len(table) == 200
    rng = np.random.default_rng(2)
    gallery = make_gallery(side_px=256)
    for item in gallery:  # noise is what PNG compresses worst
        item["xray"] = rng.normal(2000, 300, (600, 440))
        item["prediction"] = item["prediction"] + rng.normal(0, 0.02, (256, 256))
    path = write_report(tmp_path, make_metrics(), table, gallery)
    assert path.stat().st_size < 1_500_000
    for png in (tmp_path / "figures").glob("gallery_*.png"):
        assert png.stat().st_size <= GALLERY_MAX_PNG_BYTES


def test_no_pyplot_figures_left_open(full_report):
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []
