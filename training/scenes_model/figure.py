"""The README's picture of what the probe endpoint returns on the scenes model: one caption's image
and the foreground / depth maps of the bank's best layers per returned step, as one PNG
(`python -m training.scenes_model.figure --out docs/scenes-probe.png`). Computed with the library
calls the endpoint makes (tests/test_serve.py holds the served maps equal to these to 1e-3); jobs do
not import the serving layer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldmprobe.jsonout import print_line


def probe_figure(out: Path, prompt: str, seed: int, steps: list[int], guidance: float = 7.5) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldmprobe.atomic import atomic_path
    from ldmprobe.generate import Sampler
    from ldmprobe.models import SCENES_DIR, load_model
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    model = load_model("scenes")
    bank = ProbeBank.load(SCENES_DIR / "bank.safetensors", model)
    best = {p: bank.best_layers()[p][0] for p in ("foreground", "depth")}
    result = Sampler(model).generate([prompt], [seed], GenerationSettings(steps=15, guidance=guidance), layers=tuple(set(best.values())))
    size = tuple(result.images.shape[-2:])
    maps = {s: bank.apply(result.steps[s].activations, s, properties=list(best), size=size) for s in steps}
    image = result.images[0].permute(1, 2, 0).clamp(0, 1).numpy()
    fig, axes = plt.subplots(2, len(steps) + 1, figsize=(2.1 * (len(steps) + 1), 4.4))
    axes[0][0].imshow(image)
    axes[0][0].set_title("image", fontsize=8)
    axes[1][0].axis("off")
    axes[1][0].text(0, 0.5, f"“{prompt}”\nseed {seed}, guidance {guidance:g}", fontsize=7, va="center")
    for col, step in enumerate(steps, start=1):
        for row, prop in enumerate(("foreground", "depth")):
            ax = axes[row][col]
            ax.imshow(maps[step][prop, best[prop]][0].numpy(), cmap="gray" if prop == "foreground" else "magma")
            ax.set_title(f"{prop} · step {step} ({best[prop]})", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return {"figure": str(out), "layers": best}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.scenes_model.figure", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/scenes-probe.png"), help="PNG path (default: docs/scenes-probe.png)")
    p.add_argument("--prompt", default="a red sphere on a grey floor", help="caption (default: a red sphere on a grey floor)")
    p.add_argument("--seed", type=int, default=3, help="seed (default: 3)")
    p.add_argument("--steps", default="0,3,7,14", help="returned steps (default: 0,3,7,14)")
    p.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance (default: 7.5, the study's and the endpoint's)")
    args = p.parse_args(argv)
    print_line(probe_figure(args.out, args.prompt, args.seed, [int(s) for s in args.steps.split(",")], args.guidance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
