"""Write models/model.pt and models/metal_model.pt: the bundle's weights as the MONAI bundle specification names them.

The bundle itself runs from the package's safetensors files (no copy in git); tools that want the
specification's pickled state dict (e.g. ``monai.bundle ckpt_export``) get it from here, made from
the config's own ``network_def``s with the weights loaded strictly.

    python configs/bundle/scripts/export.py [--bundle_root configs/bundle]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from medinpaint.bundle import load_weights
from medinpaint.errors import MedinpaintError

FILES = {"slices": ("network_def", "model", "model.pt"), "metal": ("metal_network_def", "metal_model", "metal_model.pt")}


def export(bundle_root: Path) -> list[Path]:
    config = bundle_root / "configs" / "inference.json"
    if not config.is_file():
        raise MedinpaintError(f"{bundle_root}: not a bundle (no configs/inference.json)")
    parser = ConfigParser()
    parser.read_config(config)
    parser["bundle_root"] = str(bundle_root)
    (bundle_root / "models").mkdir(exist_ok=True)
    written = []
    for task, (net_id, model_id, name) in FILES.items():
        net, _ = load_weights(parser.get_parsed_content(net_id), parser[model_id], task)
        path = bundle_root / "models" / name
        partial = path.with_name(f".{name}.partial")
        torch.save(net.state_dict(), partial)
        partial.replace(path)  # never a half-written file under the final name
        written.append(path)
    return written


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--bundle_root", type=Path, default=Path(__file__).resolve().parent.parent)
    try:
        for path in export(args.parse_args().bundle_root):
            print(path)
    except MedinpaintError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
