"""Chat in the terminal with a trained model (interactive, one-shot or batch). See `python cli_demo.py --help`.

    python cli_demo.py --cfg-path output/shapes/config.yaml -c output/shapes/unfreeze_llm_model.pth
    python cli_demo.py --cfg-path ... -c ... --image a.png --query "What is in the image?"
    python cli_demo.py --cfg-path ... -c ... --batch questions.jsonl --out answers.jsonl
"""

import sys

from lavis.chat.cli import main

if __name__ == "__main__":
    sys.exit(main())
