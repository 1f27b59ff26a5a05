"""Write every trained weight of a pipeline checkpoint (projection + LLM in SFT; everything in the demo) to
``D/unfreeze_llm_model.pth``, with plain-model key names (``llm_proj.*``, ``llm_model.*``, ...).

    python pipemodel2pth.py --ckpt-dir output/shapes
"""

from lavis.cli import run_cli
from lavis.convert.pipe_to_pth import cli

if __name__ == "__main__":
    run_cli(lambda: cli("model", __doc__))
