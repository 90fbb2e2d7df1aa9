"""Convert a released FOMM, SAFA or face-vid2vid checkpoint to this framework's checkpoint format.

    python -m tools.convert_checkpoint vox-cpk.pth.tar fomm-vox.pth
    python -m tools.convert_checkpoint vox-cpk.pth.tar fomm-vox.pth --config config/vox-256.yaml \\
        --write-config configs/fomm-vox-converted.yaml

The input is recognized by its keys (FOMM vox-256 / vox-adv-256, SAFA end2end, SAFA 3DMM
pretraining; ``compat/checkpoints.py``). ``--config`` takes the reference YAML the checkpoint was
trained with; without it the network settings are read off the tensor shapes. The output is
``{"model", "model_params", "state_dict", "converted_from"}``; every key mapping, left-out entry
and inferred setting is printed. ``--write-config`` also writes the converted config (YAML).
The input is loaded with ``weights_only=True``: a file that would need arbitrary unpickling is
refused, not executed.
"""
import argparse
import os
import sys

import yaml

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compat.checkpoints import convert_checkpoint, load_reference_checkpoint  # noqa: E402
from compat.configs import load_reference_config  # noqa: E402
from checkpoint import save_checkpoint_atomic  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="reference checkpoint (e.g. vox-cpk.pth.tar)")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    parser.add_argument("--config", help="the reference YAML the checkpoint was trained with")
    parser.add_argument("--write-config", help="also write the converted config to this YAML")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.input):
        raise SystemExit(f"input checkpoint not found: {args.input}")
    config, config_notes = (None, [])
    if args.config:
        config, config_notes = load_reference_config(args.config)
    reference = load_reference_checkpoint(args.input)
    converted = convert_checkpoint(reference, config["model_params"] if config else None)
    save_checkpoint_atomic(converted, args.output)
    if args.write_config:
        config = config or {"model": converted["model"]}
        config["model_params"] = converted["model_params"]
        with open(args.write_config, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
    if not args.quiet:
        for note in config_notes + converted["converted_from"]["notes"]:
            print(note)
    print(f"{args.input}: {converted['converted_from']['kind']} checkpoint -> {args.output} "
          f"(model {converted['model']!r}, {len(converted['state_dict'])} entries)")
    return converted


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
