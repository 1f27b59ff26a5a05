"""Write every trained weight of a pipeline checkpoint (projection + LLM in SFT; everything in the demo) to
``D/unfreeze_llm_model.pth``, with plain-model key names (``llm_proj.*``, ``llm_model.*``, ...).

    python pipemodel2pth.py --ckpt-dir output/shapes
"""

import argparse

from lavis.convert.pipe_to_pth import convert


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", "--ckpt_dir", required=True, help="run directory or one global_step* directory")
    p.add_argument("--out", help="output file (default: CKPT_DIR/unfreeze_llm_model.pth)")
    args = p.parse_args()
    print(convert(args.ckpt_dir, "model", args.out))


if __name__ == "__main__":
    main()
