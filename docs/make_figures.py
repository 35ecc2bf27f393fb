"""Draw docs/images/merge_plan.png: the entropy of every sampling step and the merge plan built from it.

    python docs/make_figures.py [output.png]

Computed with the library's own functions (``shifted_sigmas``, ``step_entropy``, ``plan_merges``) at the
paper's setting: T=16, shift 3, noise level a=0.7, threshold tau=2.2, the first 8 steps trained.
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trl_flow_egrpo import plan_merges, shifted_sigmas, step_entropy  # noqa: E402

NUM_STEPS, SHIFT, NOISE_LEVEL, TAU, ACTIVE = 16, 3.0, 0.7, 2.2, 8
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images", "merge_plan.png")


def draw(path: str) -> None:
    """Two panels: exp(h) per step against tau; the anchor trajectory and the rollouts branching off it."""
    sigmas = shifted_sigmas(NUM_STEPS, SHIFT)
    plan = plan_merges(sigmas, NOISE_LEVEL, TAU, ACTIVE)
    single = [step_entropy(sigmas, k, 1, NOISE_LEVEL) for k in range(NUM_STEPS)]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8.5), gridspec_kw={"height_ratios": [1, 1.5]}, sharex=True)
    colors = ["tab:red" if value >= TAU else "tab:gray" for value in single]
    top.bar(
        [k + 0.5 for k in range(NUM_STEPS)],
        single,
        width=0.8,
        color=colors,
        alpha=0.6,
        label="single step: exp(h(k, 1))",
    )
    top.plot(
        [step.start + 0.5 for step in plan],
        [step.entropy for step in plan],
        "o",
        color="tab:blue",
        label="merged step of the plan: exp(h(k, l_k))",
    )
    top.axhline(TAU, color="black", linestyle="--", linewidth=1, label=f"threshold tau = {TAU}")
    top.axvspan(0, ACTIVE, color="tab:blue", alpha=0.06, label=f"active steps (first {ACTIVE})")
    top.set_ylabel("exp(h), per latent dimension")
    top.set_title(f"Step entropy and merge plan (T={NUM_STEPS}, shift {SHIFT:g}, a={NOISE_LEVEL})")
    top.legend(loc="upper right", fontsize=8)

    # Row 0: the deterministic anchor trajectory. Row i+1: the rollouts of plan step i.
    bottom.plot(range(NUM_STEPS + 1), [0] * (NUM_STEPS + 1), "k.-", linewidth=2)
    bottom.text(NUM_STEPS + 0.2, 0, "anchor (ODE)", va="center", fontsize=8)
    for row, step in enumerate(plan, start=1):
        bottom.plot([0, step.start], [row, row], color="black", linewidth=1, alpha=0.3)  # shared anchor prefix
        for spread in (-0.25, 0.0, 0.25):  # a few of the G rollouts, each with its own SDE noise
            bottom.plot([step.start, step.end], [row, row + spread], color="tab:red", linewidth=1.5)
            bottom.plot(
                [step.end, NUM_STEPS], [row + spread, row + spread], color="tab:blue", linewidth=0.8, linestyle=":"
            )
        bottom.text(NUM_STEPS + 0.2, row, f"k={step.start}, l={step.length}", va="center", fontsize=8)
    bottom.plot([], [], color="tab:red", label="merged SDE step (trained; one per rollout)")
    bottom.plot([], [], color="tab:blue", linestyle=":", label="ODE to the image (not trained)")
    bottom.set_ylim(len(plan) + 2.2, -0.8)  # room for the legend below the last row
    bottom.set_yticks([])
    bottom.set_xlim(0, NUM_STEPS + 2.6)
    bottom.set_xticks(range(NUM_STEPS + 1))
    bottom.set_xticklabels([f"{k}\n{float(s):.2f}" for k, s in enumerate(sigmas)], fontsize=7)
    bottom.set_xlabel("schedule index k  /  sigma_k")
    bottom.set_title(f"Rollouts: G per plan step branch off the anchor at k and rejoin the ODE at k + l (tau {TAU})")
    bottom.legend(loc="lower left", fontsize=8)

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else OUTPUT)
