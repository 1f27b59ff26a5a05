"""Chat in the terminal with a trained model (interactive, one-shot or batch). See `python cli_demo.py --help`.

    python cli_demo.py --cfg-path output/shapes/config.yaml -c output/shapes/unfreeze_llm_model.pth
    python cli_demo.py --cfg-path ... -c ... --image a.png --image b.png --query "Compare the images."
    python cli_demo.py --cfg-path ... -c ... --video clip.mp4 --query "What happens?"
    python cli_demo.py --cfg-path ... -c ... --batch questions.jsonl --out answers.jsonl
    python cli_demo.py --model-type qwen7b_chat -c model.pth --llm_device_map auto   # LLM over several GPUs
"""

from lavis.chat.cli import main
from lavis.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
