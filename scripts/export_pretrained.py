"""Export a trained run as a shipped pretrained model: slim checkpoint + model card.

    python scripts/export_pretrained.py runs/qm9-noh-small qm9-noh-small \
        --command "rgdm pretrain --config configs/qm9_noh_small.yaml" \
        --metrics runs/qm9-noh-small/samples/eval_n1000_metrics.json

The slim checkpoint keeps only the EMA weights (as the model's weights), the config and the model
spec, so ``rgdm.runs.load_model("<name>")`` works out of the box; the model card records data,
command, steps, wall time and sample metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rgdm.runs import PRETRAINED_DIR, load_model, resolve_checkpoint
from rgdm.training.checkpoint import load_checkpoint, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory or checkpoint")
    parser.add_argument("name", help="name of the shipped model, e.g. qm9-noh-small")
    parser.add_argument("--command", required=True, help="the command that trained the run")
    parser.add_argument("--metrics", help="JSON of sample metrics (rgdm evaluate output)")
    args = parser.parse_args()

    path = resolve_checkpoint(args.run)
    state = load_checkpoint(path)
    slim = {key: state[key] for key in ("kind", "config", "model_spec", "step", "elapsed_seconds")}
    slim["model"] = state["ema"] if state.get("ema") is not None else state["model"]
    slim["ema"] = None
    out = save_checkpoint(slim, PRETRAINED_DIR / f"{args.name}.pt")

    config = state["config"]
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else {}
    n_params = sum(p.numel() for p in load_model(out).model.parameters())
    lines = [
        f"# Model card: {args.name}",
        "",
        f"- **Data**: QM9 ({'without' if config['data']['remove_h'] else 'with'} hydrogens), split "
        f"`{config['data']['train_split']}` from the `qm9pack` wheel (EDM's splits).",
        f"- **Model**: EGNN dynamics, {config['model']['hidden_nf']} features x {config['model']['n_layers']} "
        f"layers, {n_params:,} parameters; {config['diffusion']['timesteps']} diffusion steps, "
        f"{config['diffusion']['schedule']} schedule; EMA weights ({config['train']['ema_decay']}).",
        f"- **Command**: `{args.command}`",
        f"- **Training**: {state['step']} steps of batch {config['train']['batch_size']} "
        f"({state['step'] * config['train']['batch_size'] / 1e5:.1f} epochs of 100k molecules), "
        f"{state.get('elapsed_seconds', 0) / 60:.0f} min wall time on a 2-core CPU.",
        f"- **File**: `{out.name}` ({out.stat().st_size / 1e6:.1f} MB).",
    ]
    if metrics:
        lines += ["", "Sample metrics (EDM's definitions; `rgdm evaluate`):", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    (PRETRAINED_DIR / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and its model card")


if __name__ == "__main__":
    main()
