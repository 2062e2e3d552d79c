"""A chat page in the browser: `python chat.py --web` (Gradio: pip install -e ".[web]").

A thin layer over minivlmamba.conversation's Conversation: each browser tab keeps its own
Conversation in a gr.State, so the image and each question are read once and the model's recurrent
state carries the chat, as in the terminal. Answers stream in token by token; one answer is
generated at a time, the other tabs' requests wait in Gradio's queue. Nothing is fetched from the
internet: no telemetry, and the page's scripts and fonts come from the Gradio package.
"""

import random
from argparse import Namespace
from pathlib import Path

import gradio as gr

from minivlmamba import UserError
from minivlmamba.conversation import Conversation
from minivlmamba.data import load_image
from minivlmamba.shapes import make_scene, render


def describe(ckpt, model):
    """The line naming the checkpoint and what it was trained on."""
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters()) / 1e6
    trained = (f"on LLaVA-format data, on top of {cfg.vision_path} and {cfg.lm_path}" if cfg.vision_path
               else "from scratch on the built-in shapes scenes (ask about colours, shapes, counts, positions)")
    return f"**{ckpt}**: a {params:.1f}M-parameter VL-Mamba ({cfg.connector} connector, {cfg.scan} scan), " \
           f"trained {trained}."


def serve(model, tokenizer, args):
    shapes = not model.cfg.vision_path  # train.py trains a model without a pretrained tower on shapes

    def start(image, label):
        """A new conversation about `image` -> the image shown, an empty chat, the image, its Conversation."""
        return gr.Image(image, label=label), [], image, Conversation(model, tokenizer, image, warn=gr.Warning)

    def new_scene():
        seed = random.randrange(10_000)
        rng = random.Random(seed)
        scene = make_scene(rng, held_out=True)
        return start(render(scene, rng), f"shapes scene {seed} (python chat.py --demo --seed {seed} draws it again)")

    def upload(path):
        try:
            image = load_image(path)
        except UserError as e:  # the message names the upload, not the server's copy of it
            raise gr.Error(str(e).replace(path, Path(path).name), print_exception=False) from None
        return start(image, Path(path).name)

    def clear(image):
        if image is None:
            return [], None
        return [], Conversation(model, tokenizer, image, warn=gr.Warning)

    def ask(question, history, chat, temperature, top_k, top_p, max_new_tokens):
        if chat is None:
            message = "no image yet: upload one" + (" or draw a new scene" if shapes else "")
            raise gr.Error(message, print_exception=False)
        question = question.strip()
        if not question:
            return
        history = history + [dict(role="user", content=question), dict(role="assistant", content="")]
        yield "", history
        sampling = Namespace(temperature=temperature, top_k=int(top_k), top_p=top_p, max_new_tokens=int(max_new_tokens))
        for piece in chat.ask(question, sampling):
            history[-1]["content"] += piece
            yield "", history

    with gr.Blocks(title="minivlmamba", analytics_enabled=False) as page:
        gr.Markdown(f"## Talk to VL-Mamba about an image\n{describe(args.ckpt, model)}")
        image, chat = gr.State(), gr.State()  # per tab: the image (PIL) and its Conversation
        with gr.Row():
            with gr.Column(scale=2):
                shown = gr.Image(label="no image yet", format="png", interactive=False, height=360,
                                 buttons=["download", "fullscreen"])
                with gr.Row():
                    scene_button = gr.Button("New scene", visible=shapes)
                    upload_button = gr.UploadButton("Upload an image", file_types=["image"])
            with gr.Column(scale=3):
                history = gr.Chatbot(label="conversation", height=360, buttons=["copy", "copy_all"])
                question = gr.Textbox(placeholder="Ask about the image, then press Enter", submit_btn=True,
                                      show_label=False)
                clear_button = gr.Button("Clear conversation")
        with gr.Accordion("Sampling", open=False):
            with gr.Row():
                temperature = gr.Slider(0, 2, args.temperature, step=0.05, label="temperature (0 = greedy)")
                top_k = gr.Slider(0, 200, args.top_k, step=1, label="top-k (0 = all)")
                top_p = gr.Slider(0.05, 1, args.top_p, step=0.05, label="top-p")
                max_new_tokens = gr.Slider(1, 1024, args.max_new_tokens, step=1, label="max new tokens")
        # one answer at a time over all tabs: the model is one, its other requests wait in the queue
        answering = question.submit(ask, [question, history, chat, temperature, top_k, top_p, max_new_tokens],
                                    [question, history], concurrency_limit=1, api_name="ask")
        # A new image or a cleared chat stops the answer being generated and throws its state away. (So
        # does a failed upload, which keeps the conversation: it goes on from the answer as far as shown.)
        started = [shown, history, image, chat]
        scene_button.click(new_scene, None, started, cancels=answering, api_name="new_scene")
        upload_button.upload(upload, upload_button, started, cancels=answering, api_name="upload")
        gr.on([clear_button.click, history.clear], clear, image, [history, chat], cancels=answering, api_name="clear")
        if shapes:
            page.load(new_scene, None, started)  # every tab opens on a scene of its own
    try:
        page.queue().launch(server_name=args.host, server_port=args.port, max_file_size="50mb", quiet=True,
                            prevent_thread_lock=True)
    except OSError:
        raise UserError(f"cannot serve on {args.host}:{args.port} (port taken? choose another with --port)") from None
    print(f"talk to {args.ckpt} at {page.local_url} (Ctrl-C stops)", flush=True)
    page.block_thread()
