"""Chat in the browser with a trained model (gradio; binds 127.0.0.1 by default).

    python webui_demo.py --cfg-path output/shapes/config.yaml -c output/shapes/unfreeze_llm_model.pth
"""

from lavis.chat.webui import main

if __name__ == "__main__":
    main()
