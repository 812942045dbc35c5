"""Does the virtual cohort look like the NHANES population? BMD by sex and age, WHO categories.

Two sources of patients:

- ``--sample N``: the population model only (``xbmd.synth.population.sample_patients``), its
  target total-hip aBMD per side;
- ``--cohort DIR``: a generated cohort, the measured CT-based total-hip aBMD
  (``sides.<side>.ct_abmd_g_cm2``) of every ``DIR/cases/*/truth.json``.

One value per patient, chosen by ``--side``: ``lower`` (default; the lower of the two hips,
as bilateral-hip reports classify by the worse hip), ``mean`` (closest to NHANES III, which
scanned one hip), ``left`` or ``right``. T-scores use the NHANES III white female young-adult
reference for both sexes (ISCD convention, ``xbmd.tscore``).

Printed by sex and age band: n, mean and SD of aBMD next to the NHANES III band mean and SD,
mean T-score, % osteoporosis and % osteopenia next to what a normal distribution with the NHANES
band mean and SD implies; then women and men >= 50 against the published prevalence.

Usage::

    python benchmarks/bench_population.py                      # 10,000 sampled patients
    python benchmarks/bench_population.py --plot population.png
    python benchmarks/bench_population.py --cohort out/cohort --side mean
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from xbmd.synth.population import sample_patients
from xbmd.tscore import (
    CATEGORIES,
    load_reference_data,
    reference_info,
    t_score,
    who_category,
)

SIDE_CHOICES = ("lower", "mean", "left", "right")
SITE = "total_hip"


@dataclass(frozen=True)
class Person:
    sex: str
    age_years: float
    abmd_g_cm2: dict[str, float]  # 'left', 'right'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=10000, help="patients to sample (10000)")
    parser.add_argument("--seed", type=int, default=0, help="population seed (0)")
    parser.add_argument("--cohort", type=Path, help="read DIR/cases/*/truth.json of a cohort")
    parser.add_argument("--side", choices=SIDE_CHOICES, default="lower", help="value per patient")
    parser.add_argument("--plot", type=Path, help="write a PNG figure here")
    args = parser.parse_args(argv)
    if args.cohort is not None:
        try:
            people, note = read_cohort(args.cohort)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        source = f"cohort {args.cohort} ({len(people)} cases, measured ct_abmd_g_cm2){note}"
    else:
        people = sampled_people(args.sample, args.seed)
        source = f"sample_patients({args.sample}, seed={args.seed}), target aBMD"
    print(f"# {source}; one value per patient: {args.side} side")
    ref = reference_info(SITE, "F")
    print(
        f"# T-score reference: {ref['population']}, total hip {ref['mean_g_cm2']:.3f} +/- "
        f"{ref['sd_g_cm2']:.3f} g/cm2 ({ref['status']}), used for women and men"
    )
    print("# NHANES III band mean/SD: Looker 1998, recalled values, status 'unverified'\n")
    print_band_table(people, args.side)
    print()
    print_prevalence_summary(people)
    if args.plot is not None:
        plot(people, args.side, args.plot)
        print(f"\nfigure: {args.plot}")
    return 0


def sampled_people(n: int, seed: int) -> list[Person]:
    return [
        Person(p.sex, p.age_years, dict(p.total_hip_abmd_g_cm2)) for p in sample_patients(n, seed)
    ]


def read_cohort(directory: Path) -> tuple[list[Person], str]:
    """People from ``directory/cases/*/truth.json``, and a note on measured-minus-target aBMD."""
    paths = sorted(directory.glob("cases/*/truth.json"))
    if not paths:
        raise ValueError(f"no cases/*/truth.json under {directory}")
    people, differences = [], []
    for path in paths:
        truth = json.loads(path.read_text(encoding="utf-8"))
        patient, sides = truth["patient"], truth["sides"]
        abmd = {side: float(sides[side]["ct_abmd_g_cm2"]) for side in ("left", "right")}
        people.append(Person(patient["sex"], float(patient["age_years"]), abmd))
        for side in ("left", "right"):
            target = sides[side].get("target_abmd_g_cm2")
            if target is not None:
                differences.append(abmd[side] - float(target))
    note = ""
    if differences:
        d = np.asarray(differences)
        note = f"; measured - target: mean {d.mean():+.4f}, SD {d.std():.4f} g/cm2"
    return people, note


def value_g_cm2(person: Person, side: str) -> float:
    left, right = person.abmd_g_cm2["left"], person.abmd_g_cm2["right"]
    return {"lower": min(left, right), "mean": 0.5 * (left + right), "left": left, "right": right}[
        side
    ]


def band_index(age_years: float) -> int:
    """Index of the NHANES III band (20-29, ..., 80+) of an age."""
    return int(np.clip((age_years - 20.0) // 10.0, 0, 6))


def nhanes_band(sex: str, index: int) -> tuple[float, float]:
    table = load_reference_data()["age_bands"]["female" if sex == "F" else "male"][SITE]
    return table["mean_g_cm2"][index], table["sd_g_cm2"][index]


def implied_shares(mean_g_cm2: float, sd_g_cm2: float) -> tuple[float, float]:
    """(osteoporosis, osteopenia) fractions of N(mean, sd) with the female young-adult cut-offs."""
    ref = reference_info(SITE, "F")
    op_cut = ref["mean_g_cm2"] - 2.5 * ref["sd_g_cm2"]
    penia_cut = ref["mean_g_cm2"] - 1.0 * ref["sd_g_cm2"]
    p_op = float(ndtr((op_cut - mean_g_cm2) / sd_g_cm2))
    return p_op, float(ndtr((penia_cut - mean_g_cm2) / sd_g_cm2)) - p_op


def shares(values_g_cm2: np.ndarray) -> dict[str, float]:
    cats = [who_category(t_score(v, SITE, "F")) for v in values_g_cm2]
    return {c: cats.count(c) / max(1, len(cats)) for c in CATEGORIES}


def print_band_table(people: list[Person], side: str) -> None:
    labels = load_reference_data()["age_bands"]["labels"]
    head = (
        f"{'sex':>3} {'age':>5} {'n':>6} {'aBMD':>6} {'SD':>6} {'NH mean':>7} {'NH SD':>6}"
        f" {'T':>6} {'NH T':>6} {'%OP':>5} {'NH%OP':>6} {'%OPe':>5} {'NH%OPe':>6}"
    )
    print(head)
    for sex in ("F", "M"):
        for index, label in enumerate(labels):
            group = [p for p in people if p.sex == sex and band_index(p.age_years) == index]
            if not group:
                continue
            values = np.array([value_g_cm2(p, side) for p in group])
            nh_mean, nh_sd = nhanes_band(sex, index)
            nh_op, nh_penia = implied_shares(nh_mean, nh_sd)
            got = shares(values)
            print(
                f"{sex:>3} {label:>5} {len(group):6d} {values.mean():6.3f} {values.std():6.3f}"
                f" {nh_mean:7.3f} {nh_sd:6.3f} {t_score(values.mean()):6.2f}"
                f" {t_score(nh_mean):6.2f} {100 * got['osteoporosis']:5.1f} {100 * nh_op:6.1f}"
                f" {100 * got['osteopenia']:5.1f} {100 * nh_penia:6.1f}"
            )


def print_prevalence_summary(people: list[Person]) -> None:
    prevalence = load_reference_data()["prevalence"]
    for sex, word in (("F", "women"), ("M", "men")):
        group = [p for p in people if p.sex == sex and p.age_years >= 50.0]
        if not group:
            continue
        print(f"{word} >= 50 (n = {len(group)}), female reference:")
        for side in SIDE_CHOICES:
            got = shares(np.array([value_g_cm2(p, side) for p in group]))
            print(
                f"  this population, {side:>5} side: osteoporosis "
                f"{100 * got['osteoporosis']:5.1f} %, osteopenia {100 * got['osteopenia']:5.1f} %"
            )
        op, penia = census_weighted_nhanes_shares(sex)
        print(
            f"  NHANES III bands, normal, weighted by the 2010 census ages 50+: osteoporosis "
            f"{100 * op:5.1f} %, osteopenia {100 * penia:5.1f} %"
        )
        for entry in prevalence:
            population = entry["population"]
            female_ref = "women" in entry["reference"]
            if population.startswith(f"US {word}") and female_ref:
                print(
                    f"  published {entry['survey']}, {entry['site']}: osteoporosis "
                    f"{_fmt(entry['osteoporosis_percent'])} %, osteopenia "
                    f"{_fmt(entry['osteopenia_percent'])} % [{entry['status']}]"
                )


def census_weighted_nhanes_shares(sex: str) -> tuple[float, float]:
    """NHANES-III-implied prevalence 50+, age bands weighted by the US 2010 census (women's
    counts of Wright 2014, used for men too: a close enough age mix for a check)."""
    wright = next(e for e in load_reference_data()["prevalence"] if "by_age_band" in e)
    weights = np.asarray(wright["by_age_band"]["population_2010_census"], dtype=float)
    parts = np.array([implied_shares(*nhanes_band(sex, index)) for index in (3, 4, 5, 6)])
    op, penia = (weights[:, None] * parts).sum(axis=0) / weights.sum()
    return float(op), float(penia)


def _fmt(value: float | list[float]) -> str:
    if isinstance(value, list):
        return f"{value[0]:g}-{value[1]:g}"
    return f"{value:g}"


def plot(people: list[Person], side: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xbmd.tscore import age_matched_mean_sd

    fig, (ax_scatter, ax_bars) = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = {"F": "tab:red", "M": "tab:blue"}
    ages = np.linspace(50.0, 90.0, 81)
    for sex in ("F", "M"):
        group = [p for p in people if p.sex == sex]
        ax_scatter.scatter(
            [p.age_years for p in group],
            [value_g_cm2(p, side) for p in group],
            s=3,
            alpha=0.25,
            color=colours[sex],
            label=f"{'women' if sex == 'F' else 'men'} (n = {len(group)})",
        )
        curve = np.array([age_matched_mean_sd(SITE, sex, a) for a in ages])
        ax_scatter.plot(ages, curve[:, 0], color=colours[sex], lw=2)
        low, high = curve[:, 0] - curve[:, 1], curve[:, 0] + curve[:, 1]
        ax_scatter.fill_between(ages, low, high, color=colours[sex], alpha=0.15)
    ref = reference_info(SITE, "F")
    for t, style in ((-1.0, "--"), (-2.5, ":")):
        ax_scatter.axhline(ref["mean_g_cm2"] + t * ref["sd_g_cm2"], color="k", ls=style, lw=1)
    ax_scatter.set_xlabel("age (years)")
    ax_scatter.set_ylabel(f"total-hip aBMD, {side} side (g/cm2)")
    ax_scatter.set_title("aBMD vs age; NHANES III mean +/- SD; T = -1 (--), -2.5 (:)")
    ax_scatter.legend(loc="upper right", markerscale=4)
    _plot_category_bars(ax_bars, people, side)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_category_bars(ax, people: list[Person], side: str) -> None:
    women = [p for p in people if p.sex == "F" and p.age_years >= 50.0]
    got = shares(np.array([value_g_cm2(p, side) for p in women]))
    op, penia = census_weighted_nhanes_shares("F")
    wright = next(e for e in load_reference_data()["prevalence"] if "by_age_band" in e)
    looker = load_reference_data()["prevalence"][0]
    bars = {
        f"this population ({side})": (got["osteopenia"], got["osteoporosis"]),
        "NHANES III bands,\n2010 census ages": (penia, op),
        "NHANES 2005-10\nneck or spine": (
            wright["osteopenia_percent"] / 100,
            wright["osteoporosis_percent"] / 100,
        ),
    }
    x = np.arange(len(bars))
    penia_values = [v[0] for v in bars.values()]
    op_values = [v[1] for v in bars.values()]
    ax.bar(x - 0.18, [100 * v for v in op_values], 0.36, color="tab:red", label="osteoporosis")
    ax.bar(x + 0.18, [100 * v for v in penia_values], 0.36, color="tab:orange", label="osteopenia")
    low_op, high_op = looker["osteoporosis_percent"]
    low_pe, high_pe = looker["osteopenia_percent"]
    ax.axhspan(low_op, high_op, color="tab:red", alpha=0.12, label="NHANES III range (Looker 1997)")
    ax.axhspan(low_pe, high_pe, color="tab:orange", alpha=0.12)
    ax.set_xticks(x, list(bars))
    ax.set_ylim(0.0, 75.0)
    ax.set_ylabel("% of women >= 50")
    ax.set_title("WHO categories, women >= 50, total hip (female reference)")
    ax.legend(loc="upper center", ncol=2, fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
