"""Chat in the browser with a trained model (gradio; binds 127.0.0.1 by default). See `python webui_demo.py --help`.

    python webui_demo.py --cfg-path output/shapes/config.yaml -c output/shapes/unfreeze_llm_model.pth
    python webui_demo.py --model-type qwen7b_chat -c model.pth --load-8bit      # one 24 GB GPU
    python webui_demo.py --model-type qwen14b_chat -c model.pth --llm_device_map auto   # several GPUs
"""

from lavis.chat.webui import main
from lavis.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
