"""The README's picture of the probe endpoint on the scenes model: one caption through the probe
service in-process (the code TorchServe runs), its answer's image and foreground / depth maps per
returned step, as one PNG (`python -m training.scenes_model.figure --out docs/scenes-probe.png`)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path


def probe_figure(out: Path, prompt: str, seed: int, steps: list[int]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from ldmprobe.atomic import atomic_path
    from ldmprobe.models import SCENES_DIR
    from ldmprobe.serve.probe import ProbeService

    service = ProbeService.load("scenes", str(SCENES_DIR / "bank.safetensors"), compile=False)
    body = {"prompt": prompt, "seed": seed, "steps": 15, "return_steps": steps,
            "properties": ["foreground", "depth"], "format": "png"}
    outcome = service.handle([json.dumps(body)])[0]
    if outcome.status != 200:
        raise RuntimeError(f"probe service answered {outcome.status}: {outcome.body}")
    answer = outcome.body

    def png(data: str):
        return Image.open(io.BytesIO(base64.b64decode(data)))

    fig, axes = plt.subplots(2, len(steps) + 1, figsize=(2.1 * (len(steps) + 1), 4.4))
    axes[0][0].imshow(png(answer["image"]["png"]))
    axes[0][0].set_title("image", fontsize=8)
    axes[1][0].axis("off")
    axes[1][0].text(0, 0.5, f"“{prompt}”\nseed {seed}", fontsize=7, va="center")
    for col, step in enumerate(answer["steps"], start=1):
        for row, prop in enumerate(("foreground", "depth")):
            entry = {m["property"]: m for m in step["maps"]}[prop]
            ax = axes[row][col]
            ax.imshow(png(entry["png"]), cmap="gray" if prop == "foreground" else "magma")
            ax.set_title(f"{prop} · step {step['step']} ({entry['layer']})", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return {"figure": str(out), "layers": {m["property"]: m["layer"] for m in answer["steps"][-1]["maps"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.scenes_model.figure", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/scenes-probe.png"), help="PNG path (default: docs/scenes-probe.png)")
    p.add_argument("--prompt", default="a red sphere on a grey floor", help="caption (default: a red sphere on a grey floor)")
    p.add_argument("--seed", type=int, default=3, help="seed (default: 3)")
    p.add_argument("--steps", default="0,3,7,14", help="returned steps (default: 0,3,7,14)")
    args = p.parse_args(argv)
    print(json.dumps(probe_figure(args.out, args.prompt, args.seed, [int(s) for s in args.steps.split(",")])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
