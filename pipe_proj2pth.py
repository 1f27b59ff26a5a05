"""Write the projection (``llm_proj.*``) of a pipeline checkpoint to ``D/model.pth`` (the stage-1 release format).

    python pipe_proj2pth.py --ckpt-dir output/shapes_pretrain            # the run's latest checkpoint
    python pipe_proj2pth.py --ckpt-dir output/shapes_pretrain/global_step100
"""

from lavis.cli import run_cli
from lavis.convert.pipe_to_pth import cli

if __name__ == "__main__":
    run_cli(lambda: cli("proj", __doc__))
