"""Write the projection (``llm_proj.*``) of a pipeline checkpoint to ``D/model.pth`` (the stage-1 release format).

    python pipe_proj2pth.py --ckpt-dir output/shapes_pretrain            # the run's latest checkpoint
    python pipe_proj2pth.py --ckpt-dir output/shapes_pretrain/global_step100
"""

import argparse

from lavis.convert.pipe_to_pth import convert


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", "--ckpt_dir", required=True, help="run directory or one global_step* directory")
    p.add_argument("--out", help="output file (default: CKPT_DIR/model.pth)")
    args = p.parse_args()
    print(convert(args.ckpt_dir, "proj", args.out))


if __name__ == "__main__":
    main()
